"""One process of the two-process test: `python -m tests.multihost_worker WORKDIR STEPS OUT.npz`.

Launched twice with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set; each process
has 4 CPU devices, reads its own half of the data and trains on the global 8-device mesh.
"""

import os
import sys

from tests.xla_flags import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
from jax.experimental import multihost_utils

from multimodal_jax import distributed


def main(workdir: str, steps: int, out: str) -> None:
  assert distributed.maybe_initialize(), "launch with JAX_COORDINATOR_ADDRESS set"
  assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
  from tests import test_loop, toy  # after initialize: they import the trainer

  result = test_loop._fit(workdir, steps=steps, mesh="data:4,fsdp:2", checkpoint_every=3)
  params = multihost_utils.process_allgather(result.state.params, tiled=True)
  local_rows = next(iter(result.state.params["hidden_0"]["kernel"].addressable_shards)).data.shape
  if jax.process_index() == 0:
    flat = {k: np.asarray(v) for k, v in toy.flatten(params)}
    np.savez(out, local_shard_shape=np.asarray(local_rows), **flat)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
