"""Train-step throughput of the fusion experiment on 1 and 8 devices, and its fraction of the
machine's matmul peak measured in the same run.

  python -m benchmarks.train_step [--batch 256] [--repeats 5] [--steps 20]

Prints one table. The 8 "devices" on a CPU host are XLA host-platform devices sharing the same
cores, so the 8-device row measures the cost of sharding (collectives, partitioning), not a
speed-up. Say which allocator ran (tcmalloc is preloaded by `python -m experiments.*` and by this
script when installed).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  from multimodal_jax.launch import maybe_reexec_with_tcmalloc

  maybe_reexec_with_tcmalloc()

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.common import matmul_peak
from multimodal_jax import profiling, train
from multimodal_jax import sharding as shd
from multimodal_jax.datasets import av_digits
from multimodal_jax.fusion import config as fusion_config
from multimodal_jax.fusion import data as fusion_data
from multimodal_jax.fusion import losses as fusion_losses
from multimodal_jax.fusion import model as fusion_model


def synthetic_batch(batch: int) -> dict:
  rng = np.random.default_rng(0)
  return {
    "image": rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8),
    "audio": rng.normal(size=(batch, av_digits.AUDIO_FRAMES, av_digits.MEL_BINS)).astype(np.float32),
    "label": rng.integers(0, 10, (batch,)).astype(np.int32),
  }


def bench_step(config, devices, batch_size: int, steps: int, repeats: int) -> tuple[float, float | None]:
  """Median examples/s over `repeats` timings of `steps` steps, and FLOPs per step."""
  mesh = shd.make_mesh("data:-1", devices)
  model = fusion_model.build_model(config)
  example = {k: v[:1] for k, v in synthetic_batch(1).items()}
  modalities = fusion_data.modalities_of(config)

  def init_params(rng):
    return model.init({"params": rng}, fusion_data.model_inputs(example, modalities), train=False)["params"]

  tx, _ = train.make_optimizer(config)
  _, shardings = train.abstract_train_state(init_params, tx, mesh)
  state = train.init_train_state(init_params, tx, shardings, jax.random.key(0))
  step = train.make_train_step(fusion_losses.make_loss_fn(model, config), tx, mesh, shardings)
  batch = shd.host_to_global_batch(synthetic_batch(batch_size), mesh)
  per_device = profiling.cost_analysis_flops(step.lower(state, batch).compile())  # XLA counts one device's share
  flops = per_device * len(devices) if per_device else None
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    rates.append(batch_size * steps / (time.perf_counter() - t0))
  return statistics.median(rates), flops


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--fusion", default="joint")
  args = parser.parse_args(argv)
  config = fusion_config.get_config()
  config.fusion = args.fusion
  allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
  peak = matmul_peak(2048)
  print(
    f"fusion={args.fusion} batch={args.batch} float32, {allocator}; "
    f"matmul peak (2048^2, 1 device): {peak / 1e9:.1f} GFLOP/s"
  )
  print(f"{'devices':>7} | {'examples/s':>10} | {'GFLOP/step':>10} | {'GFLOP/s':>8} | {'of peak':>7}")
  for n in (1, 8):
    rate, flops = bench_step(config, jax.devices()[:n], args.batch, args.steps, args.repeats)
    achieved = flops * rate / args.batch if flops else float("nan")
    print(
      f"{n:>7} | {rate:>10.0f} | {flops / 1e9 if flops else float('nan'):>10.3f} | "
      f"{achieved / 1e9:>8.1f} | {achieved / peak:>7.1%}"
    )


if __name__ == "__main__":
  sys.exit(main())
