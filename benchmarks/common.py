"""What every benchmark shares: the machine's matmul peak and whether other processes shared the CPU."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted float32 [n, n] @ [n, n] on one device (best of `repeats`), the MFU reference."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def busy_cpu_seconds() -> float | None:
  """CPU seconds all processes have been busy since boot (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def warn_if_shared(others: float | None, what: str = "the ratios are") -> None:
  """Say so when other processes took CPU while timing (PyTorch suffers far more than XLA from that)."""
  if others is not None and others > 0.1:
    print(
      f"warning: other processes took {others:.2f} CPUs while timing: PyTorch's OpenMP threads slow down "
      f"far more than XLA's under contention, so {what} inflated; rerun on a quiet machine"
    )
