"""Training batches straight from webdataset shards (`data.wds`) vs from the prepared image cache: images per second.

  python -m benchmarks.wds_loading [--images 2000] [--source_size 128] [--image_size 32] [--workers 0]

Writes `--images` synthetic JPEGs (`--source_size` px on the shorter side, 4:3) twice: as files listed in a CSV
(prepared into the array_record image cache, as `csv:` specs are) and as webdataset shards of `--per_shard`
samples (`.jpg` + `.txt`). Both are then read through `GrainBatches` with the same normalizing transform,
`--batches` batches of `--batch_size` after a warm-up of 5. The cache reads final pixels; the shards decode and
resize every image on every read, so the ratio is what streaming costs per image, against no copy of the data
and no preparation. Prints the one-off costs (cache preparation, shard indexing) and a table naming the CPU.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.data_loading import batches_per_second, cpu_name
from multimodal_jax.data import specs, wds


def write_data(folder: str, count: int, source_size: int, per_shard: int) -> tuple[str, str]:
  """Synthetic smooth JPEGs as files + a CSV, and the same bytes as shards; returns (csv path, shard pattern)."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  rows = ["filepath\ttitle"]
  for first in range(0, count, per_shard):
    with tarfile.open(os.path.join(folder, f"shard-{first // per_shard:05d}.tar"), "w") as tar:
      for i in range(first, min(first + per_shard, count)):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8))
        image = coarse.resize((source_size * 4 // 3, source_size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        data, caption = buffer.getvalue(), f"synthetic image {i}".encode()
        with open(os.path.join(folder, "images", f"{i:06d}.jpg"), "wb") as f:
          f.write(data)
        rows.append(f"images/{i:06d}.jpg\tsynthetic image {i}")
        for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption)):
          info = tarfile.TarInfo(name)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  with open(os.path.join(folder, "pairs.tsv"), "w") as f:
    f.write("\n".join(rows) + "\n")
  last = (count - 1) // per_shard
  return os.path.join(folder, "pairs.tsv"), os.path.join(folder, f"shard-{{00000..{last:05d}}}.tar")


def images_per_second(source, batch_size: int, workers: int, batches: int) -> float:
  return batches_per_second(source, batch_size, workers, batches) * batch_size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--source_size", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--per_shard", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--workers", default="0")
  parser.add_argument("--dir", default="", help="where to write the data (default: a temporary folder)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    folder = args.dir or scratch
    csv_path, pattern = write_data(folder, args.images, args.source_size, args.per_shard)
    start = time.perf_counter()
    settings = specs.DataSettings(image_size=args.image_size, channels=3, data_dir=folder)
    cached = specs.open_dataset(f"csv:{csv_path}", settings, need=("image", "text")).split("train")
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    wds.open_wds(pattern, os.path.join(folder, "wds_index"), args.image_size, 3)
    indexed = time.perf_counter() - start
    start = time.perf_counter()
    shards = wds.open_wds(pattern, os.path.join(folder, "wds_index"), args.image_size, 3)
    reopened = time.perf_counter() - start
    print(f"CPU: {cpu_name()} ({platform.machine()})")
    print(
      f"{args.images} JPEGs of {args.source_size * 4 // 3}x{args.source_size} px -> {args.image_size} px; "
      f"image cache prepared in {prepared:.2f} s; {len(shards.shards)} shards indexed in {indexed:.3f} s, "
      f"reopened from the cached index in {reopened:.3f} s"
    )
    print("| workers | image cache images/s | wds shards images/s | cache / wds |")
    print("|---|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
      rate_cache = images_per_second(cached, args.batch_size, workers, args.batches)
      rate_wds = images_per_second(shards, args.batch_size, workers, args.batches)
      print(f"| {workers} | {rate_cache:,.0f} | {rate_wds:,.0f} | {rate_cache / rate_wds:.1f}x |", flush=True)
    print(f"skipped samples: {shards.skipped_samples}")


if __name__ == "__main__":
  main()
