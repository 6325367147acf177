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
- `--xla_backend_optimization_level=1`: what `optimized()` compiles with (outside it JAX sets 0). Level 1 runs
  those programs about as fast as XLA's default level 3 and compiles them in much less time.
The HLO passes (fusion, SPMD partitioning, buffer assignment: what the memory, resharding and plan tests read)
run as always. Floats can differ in the last bit from the default build (a value recomputed in two fusions, a
sum taken in another order): every value test's tolerance holds, PyTorch parity included. No JAX import at the top:
workers set this before JAX starts.
"""

import contextlib

QUICK_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=1")
QUICK_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # XLA's backend at -O0 (LLVM's cheap passes only)


@contextlib.contextmanager
def optimized():
  """XLA's optimizing backend (level 1 in the tests, QUICK_COMPILE) for what compiles inside: for a test
  whose programs run many times, where a faster program pays for its longer compile (docs/testing.md, one
  worker, measured at XLA's default level against -O0): AVDCNN's 300 learning steps (22.7 -> 10.1 s), the
  autoencoder's 100 (15.3 -> 11.3 s), CLIP's CSV run of 10 steps over the BPE vocabulary's embedding table
  (23 -> 17.5 s), the digit classifier's 100 (14.9 -> 8.9 s). Not for a block that initialises a model: a
  parameter init (a threefry draw a leaf) can take 10x longer to compile optimized."""
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
