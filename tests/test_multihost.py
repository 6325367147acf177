"""Two processes on localhost (gloo CPU collectives, 4 devices each) train and checkpoint; one
process with a different 8-device mesh restores the checkpoint and continues."""

import os
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest

from tests import test_loop, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_then_one_process_resumes_on_another_mesh(tmp_path):
  workdir, out = tmp_path / "run", tmp_path / "params.npz"
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_worker", str(workdir), "6", str(out)],
      env=dict(env, JAX_PROCESS_ID=str(i)),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  saved = np.load(out)
  assert tuple(saved["local_shard_shape"]) == (8, 32)  # [16, 32] kernel split over fsdp=2
  assert max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == 6

  # This pytest process: one process, 8 devices, a different mesh.
  restored = test_loop._fit(workdir, steps=6, mesh="data:2,fsdp:2,tensor:2")
  assert restored.start_step == 6
  flat = dict(toy.flatten(toy.params_of(restored.state)))
  chex.assert_trees_all_equal(flat, {k: saved[k] for k in flat})
  kernel = restored.state.params["hidden_0"]["kernel"]
  assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")
  continued = test_loop._fit(workdir, steps=9, mesh="data:2,fsdp:2,tensor:2")
  assert continued.start_step == 6 and int(continued.state.step) == 9
  assert all(np.isfinite(x).all() for x in toy.params_of(continued.state).values() for x in x.values())
