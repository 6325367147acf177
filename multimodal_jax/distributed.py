"""Joining a multi-process (multi-host) run.

`maybe_initialize()` calls `jax.distributed.initialize` when the process was launched as one of
several, and does nothing for a single process:
- explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
  (any cluster; also two processes on one machine, as the tests do);
- SLURM with more than one task (srun): peers found from SLURM's variables;
- a TPU pod slice (several workers in TPU_WORKER_HOSTNAMES): peers found from the TPU metadata.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os

import jax

# Device nodes of the accelerators JAX's plugins drive: NVIDIA GPUs, AMD GPUs (ROCm), TPU v2-v5e
# (/dev/accel*) and TPU v5p/v6e (/dev/vfio/N).
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
ACCELERATOR_PLUGINS = ("libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_plugins.xla_rocm")


def cpu_without_accelerators() -> bool:
  """Runs JAX on the CPU when the host has no accelerator device but an accelerator plugin is installed
  (the `[plan]` extra's libtpu and CUDA plugin, for compiling to a target); returns whether it did. JAX
  would otherwise start every installed plugin and print its failure (a CUDA traceback, libtpu's TPU
  probing) above the run's own output. A JAX_PLATFORMS that is set is left alone; call it before the
  backends start (importing JAX is fine)."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return False
  if any(glob.glob(pattern) for pattern in ACCELERATOR_NODES):
    return False
  if not any(_installed(name) for name in ACCELERATOR_PLUGINS):
    return False
  with contextlib.suppress(Exception):  # backends already started: nothing to change
    jax.config.update("jax_platforms", "cpu")
    return True
  return False


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # the parent package (jax_plugins) is absent
    return False


def maybe_initialize() -> bool:
  """Initializes jax.distributed if launched as one of several processes; returns whether it did."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    local = env.get("JAX_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
      coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(env["JAX_NUM_PROCESSES"]),
      process_id=int(env["JAX_PROCESS_ID"]),
      local_device_ids=[int(i) for i in local.split(",")] if local else None,
    )
    return True
  slurm_tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
  tpu_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if slurm_tasks > 1 or len(tpu_workers) > 1:
    jax.distributed.initialize()  # cluster auto-detection
    return True
  return False
