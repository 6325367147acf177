"""One-command accelerator check: each experiment's default run, shortened and in bfloat16, on this
machine's GPU or TPU; examples/s, TFLOP/s per device, MFU and peak device memory per experiment,
and whether the training loss fell.

  scripts/accelerator_check.sh [--steps 300] [--workdir DIR] [--only clip,fusion]

Each experiment runs in its own process (`python -m experiments.NAME --workdir DIR/NAME
--config.dtype=bfloat16 --config.steps=STEPS`; latent diffusion's two stages get STEPS each) and
is read back from its `metrics.jsonl` files: examples/s, `tflops_per_sec_per_device`, `mfu` and
`peak_memory_gib` are medians over the logged steps after the first (which includes compilation);
"loss fell" compares the mean loss of the first and the last fifth of the logged steps. Exit status
0 when every loss fell, 1 otherwise, 2 on a machine without an accelerator (one line says so).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

EXPERIMENTS = ("fusion", "clip", "avdcnn", "latent_diffusion")


def overrides(name: str, steps: int) -> list[str]:
  """The command-line overrides that shorten experiment `name` to `steps` steps in bfloat16."""
  if name == "latent_diffusion":
    from multimodal_jax.latent_diffusion.config import get_config

    config = get_config()
    args = ["--config.dtype=bfloat16"]
    for section in ("autoencoder", "denoiser"):
      args.append(f"--config.{section}.steps={steps}")
      if "dtype" in config[section]:
        args.append(f"--config.{section}.dtype=bfloat16")
    if "final_eval" in config:
      args.append("--config.final_eval=False")
    return args
  return ["--config.dtype=bfloat16", f"--config.steps={steps}"]


def read_metrics(workdir: str) -> list[list[dict]]:
  """The records of every `metrics.jsonl` under `workdir` (one list per file, in step order)."""
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "**", "metrics.jsonl"), recursive=True)):
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    if records:
      runs.append(sorted(records, key=lambda r: r["step"]))
  return runs


def summarize(records: list[dict]) -> dict:
  """Medians of the throughput figures after the first logged step, and whether the loss fell."""
  later = records[1:] or records

  def median(key):
    values = [r[key] for r in later if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None

  losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
  fifth = max(1, len(losses) // 5)
  first, last = statistics.fmean(losses[:fifth]), statistics.fmean(losses[-fifth:])
  return {
    "examples_per_sec": median("examples_per_sec"),
    "tflops_per_sec_per_device": median("tflops_per_sec_per_device"),
    "mfu": median("mfu"),
    "peak_memory_gib": max((r["peak_memory_gib"] for r in records if "peak_memory_gib" in r), default=None),
    "loss_first": first,
    "loss_last": last,
    "loss_fell": len(losses) >= 2 and last < first,
  }


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--workdir", default="", help="default: a new temporary directory")
  parser.add_argument("--only", default="", help=f"comma list of {', '.join(EXPERIMENTS)}")
  args = parser.parse_args(argv)

  import jax

  backend = jax.default_backend()
  if backend == "cpu":
    print("accelerator check: no GPU or TPU here (JAX's backend is cpu); run it on an accelerator machine")
    return 2
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(EXPERIMENTS)
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown:
    print(f"accelerator check: unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    return 2
  root = args.workdir or tempfile.mkdtemp(prefix="accelerator_check_")
  device = jax.devices()[0]
  print(
    f"{len(jax.devices())} x {device.device_kind} ({backend}); {args.steps} steps each in bfloat16; workdirs under {root}"
  )
  rows, failed = [], False
  for name in names:
    workdir = os.path.join(root, name)
    cmd = [sys.executable, "-m", f"experiments.{name}", "--workdir", workdir, *overrides(name, args.steps)]
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    seconds = time.perf_counter() - started
    runs = read_metrics(workdir)
    if proc.returncode or not runs:
      print(f"{name}: exited with status {proc.returncode}, {len(runs)} metrics files", flush=True)
      failed = True
      continue
    for i, records in enumerate(runs):
      label = name if len(runs) == 1 else f"{name}[{i}]"
      summary = summarize(records) | {"experiment": label, "seconds": seconds}
      failed |= not summary["loss_fell"]
      rows.append(summary)
  print(
    f"\n{'experiment':<20} | {'examples/s':>10} | {'TFLOP/s/dev':>11} | {'MFU':>6} | {'peak GiB':>8} | "
    f"{'loss first -> last':>20} | fell"
  )
  for r in rows:
    print(
      f"{r['experiment']:<20} | {_fmt(r['examples_per_sec'], '10.1f')} | "
      f"{_fmt(r['tflops_per_sec_per_device'], '11.2f')} | {_fmt(r['mfu'], '6.1%')} | "
      f"{_fmt(r['peak_memory_gib'], '8.2f')} | {r['loss_first']:>9.4f} -> {r['loss_last']:<7.4f} | "
      f"{'yes' if r['loss_fell'] else 'NO'}"
    )
  print(json.dumps({"device": device.device_kind, "steps": args.steps, "rows": rows, "ok": not failed}))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
