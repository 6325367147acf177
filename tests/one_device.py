"""An experiment's `main(argv)` run in a subprocess on one CPU device, for the tests about data, files and the
command line rather than the mesh: latent diffusion's folder run (train + sample + eval) took 45 s in the pytest
process and 37 s so, imports and the session's compile cache included. Not every program compiles faster on one
device (the digits autoencoder's train step: 10.6 s there, 7.9 s on 8; single timings vary by up to 40%).
The argvs run one after another in the one process (one import, one data load), each with its own stdout and
stderr, as a test in the pytest process reads them with capsys."""

import json
import os
import subprocess
import sys

from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = """
import contextlib, io, json, sys
from tests import runs
main = runs.experiment(sys.argv[1]).main
results = []
for argv in json.loads(sys.argv[2]):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main(argv)
  results.append((status, out.getvalue(), err.getvalue()))
  if status != 0:
    break
print(json.dumps(results))
"""


def run_mains(experiment: str, *argvs: list[str], cwd: str = ROOT) -> list[tuple[int, str, str]]:
  """`(exit status, stdout, stderr)` of `multimodal_jax.<experiment>.run.main(argv)` for each argv, in order, in
  one subprocess on one CPU device; it stops after the first that fails. A crash of the process fails the test."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(1))
  done = subprocess.run(
    [sys.executable, "-c", _SCRIPT, experiment, json.dumps([[str(a) for a in argv] for argv in argvs])],
    cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]
