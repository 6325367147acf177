"""Reading the image cache through `GrainBatches` with 0, 1, 2 ... grain worker processes: batches per second.

  python -m benchmarks.data_loading --spec csv:PAIRS.tsv --data_dir DIR [--image_size 32] [--workers 0,1,2]

Prepares the cache first (timed, once), then reads `--batches` shuffled batches of `--batch_size`
records per worker count, after a warm-up of 5 batches, and prints a table naming the CPU.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from multimodal_jax.data import image_files, specs
from multimodal_jax.data.pipeline import GrainBatches


def cpu_name() -> str:
  """The CPU's model name and vector extensions, from /proc/cpuinfo (as `lscpu` shows them)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or "unknown CPU"
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
  isa = ", ".join(f for f in ("avx512f", "avx2", "fma", "sse4_2") if f in flags)
  return f"{model}, {info.count('processor')} cores, {isa or 'no AVX'}"


def _normalize(record: dict) -> dict:
  """uint8 image -> float32 normalized with CLIP's mean/std (the work a training transform does)."""
  mean, std = image_files.PRESETS["openai"]
  return {"image": image_files.normalize(record["image"], mean, std)}


def batches_per_second(source, batch_size: int, workers: int, batches: int) -> float:
  """Batches per second of `GrainBatches` over `source` (normalized float32 images), after 5 warm-up batches."""
  stream = GrainBatches(source, batch_size, seed=0, transform=_normalize, workers=workers)
  try:
    for _ in range(5):
      next(stream)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(stream)
    elapsed = time.perf_counter() - start
  finally:
    stream.close()
  assert batch["image"].shape[0] == batch_size and batch["image"].dtype == np.float32
  return batches / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spec", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--workers", default="0,1,2")
  args = parser.parse_args()
  settings = specs.DataSettings(image_size=args.image_size, channels=3, data_dir=args.data_dir)
  start = time.perf_counter()
  source = specs.open_dataset(args.spec, settings).split("train")
  prepared = time.perf_counter() - start
  print(
    f"CPU: {cpu_name()} ({platform.machine()}); {len(source)} images of {args.image_size} px ready in {prepared:.1f} s"
  )
  print("| workers | batches/s | images/s |")
  print("|---|---|---|")
  for workers in (int(w) for w in args.workers.split(",")):
    rate = batches_per_second(source, args.batch_size, workers, args.batches)
    print(f"| {workers} | {rate:.1f} | {rate * args.batch_size:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
