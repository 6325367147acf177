"""Per-device memory of value_and_grad of CLIP's softmax loss on 8 devices: all-gather vs ring (chunked).

  python -m benchmarks.contrastive_loss_memory [--batches 256 1024 4096 16384] [--dim 512]

Compiles (does not run) jit(value_and_grad) of `clip_softmax_loss_gathered` and `clip_softmax_loss_chunked` with
respect to both feature matrices and the scale, the features float32 `[batch, dim]` split over a "data:8" mesh, and
prints XLA's `memory_analysis()` of each: temp bytes (scratch buffers) and peak bytes per device, the latter as
arguments + outputs − aliased + temp (an upper bound; the CPU backend's `peak_memory_in_bytes` omits the temps).
The 8 devices are XLA host-platform devices; the byte counts are those of one device's partitioned program.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse

import jax
import jax.numpy as jnp

from multimodal_jax import sharding as shd
from multimodal_jax.clip import losses


def compiled_memory(loss_fn, mesh, batch: int, dim: int) -> tuple[int, int]:
  """(temp bytes, peak bytes) per device of jit(value_and_grad(loss_fn)) on `[batch, dim]` float32 features."""
  features = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=shd.batch_sharding(mesh, 2))
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  step = jax.jit(jax.value_and_grad(lambda i, t, s: loss_fn(i, t, s, mesh), argnums=(0, 1, 2)))
  stats = step.lower(features, features, scale).compile().memory_analysis()
  temp = stats.temp_size_in_bytes
  return temp, stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + temp


def mib(n: int) -> str:
  return f"{n / 2**20:.2f}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 16384])
  parser.add_argument("--dim", type=int, default=512)
  args = parser.parse_args(argv)
  mesh = shd.make_mesh("data:8")
  print(f"value_and_grad of the CLIP softmax loss, float32, dim {args.dim}, {jax.device_count()} devices (data:8)")
  print("MiB per device; ratio = gathered / chunked")
  header = ("batch", "gathered temp", "chunked temp", "temp ratio", "gathered peak", "chunked peak", "peak ratio")
  print(" | ".join(f"{h:>13}" for h in header))
  for batch in args.batches:
    g_temp, g_peak = compiled_memory(losses.clip_softmax_loss_gathered, mesh, batch, args.dim)
    c_temp, c_peak = compiled_memory(losses.clip_softmax_loss_chunked, mesh, batch, args.dim)
    row = (
      str(batch),
      mib(g_temp),
      mib(c_temp),
      f"{g_temp / max(c_temp, 1):.1f}x",
      mib(g_peak),
      mib(c_peak),
      f"{g_peak / max(c_peak, 1):.1f}x",
    )
    print(" | ".join(f"{c:>13}" for c in row))


if __name__ == "__main__":
  sys.exit(main())
