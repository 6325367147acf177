"""The XLA settings every test process runs with (pytest's, via conftest.py, and the subprocesses tests start
with an environment of their own): N simulated CPU devices, and XLA:CPU's quickest code generation.

Most of the suite's CPU time is compiling small programs that then run a few steps, so the tests compile for
speed of compiling (docs/testing.md has the measurements):
- LLVM at -O0 for the generated code (about 30% off the whole suite), through JAX's
  `jax_disable_most_optimizations` (QUICK_COMPILE_ENV) rather than XLA_FLAGS, so that a test can lift it for
  the programs it runs many times (`optimized()`).
- `--xla_cpu_use_fusion_emitters=false`: fusions emitted element by element, not through XLA:CPU's MLIR fusion
  emitters, whose pipeline is most of a compile at -O0: compiles of the tiny train steps take 45-60% less
  (CLIP-ViT 4.0 -> 2.3 s, DiT 3.4 -> 2.0 s, AVDCNN 2.9 -> 1.1 s), with no slower steps.
The HLO passes (fusion, SPMD partitioning, buffer assignment: what the memory, resharding and plan tests read)
run as always. Floats can differ in the last bit from the default build (a value recomputed in two fusions, a
sum taken in another order): every value test's tolerance holds, PyTorch parity included. No JAX import at the top:
workers set this before JAX starts.
"""

import contextlib

QUICK_COMPILE = ("--xla_cpu_use_fusion_emitters=false",)
QUICK_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # XLA's backend at -O0 (LLVM's cheap passes only)
# A test's own step that runs hundreds of times (the AVDCNN and autoencoder learning checks) is the exception: LLVM at
# -O2 for that one program (`jax.jit(step, compiler_options=RUN_MANY)`), which then runs about twice as fast
# (AVDCNN's 300 steps 22.7 -> 10.8 s) for a compile a fraction of a second longer.
RUN_MANY = {"xla_backend_optimization_level": 2}


@contextlib.contextmanager
def optimized():
  """XLA's default optimization (LLVM -O2) for what compiles inside, as a user's run has: for a test whose
  library programs run many times (CLIP's big-vocabulary train step on a CSV, the digit classifier's 100 steps),
  where a faster program pays for its longer compile (measured: 23 -> 16 s and 14 -> 9 s on one core)."""
  import jax

  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def device_count_flag(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices}"


def xla_flags(devices: int) -> str:
  """The XLA_FLAGS of a test subprocess with `devices` simulated CPU devices."""
  return " ".join((device_count_flag(devices), *QUICK_COMPILE))
