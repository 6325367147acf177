"""Joining a multi-process (multi-host) run.

`maybe_initialize()` calls `jax.distributed.initialize` when the process was launched as one of
several, and does nothing for a single process:
- explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
  (any cluster; also two processes on one machine, as the tests do);
- SLURM with more than one task (srun): peers found from SLURM's variables;
- a TPU pod slice (several workers in TPU_WORKER_HOSTNAMES): peers found from the TPU metadata.
"""

from __future__ import annotations

import os

import jax


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
