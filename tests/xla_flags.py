"""The XLA flags every test process runs with (pytest's, via conftest.py, and the subprocesses tests start
with an environment of their own): N simulated CPU devices, and LLVM at -O0 for XLA:CPU's generated code.

-O0: most of the suite's CPU time is compiling small programs that then run a few steps, and -O0 cuts the
whole suite's CPU time by about 30% (docs/testing.md). The HLO passes (fusion, SPMD partitioning, buffer
assignment: what the memory, resharding and plan tests read) are not LLVM's and run as always. Floats can
differ from -O2 in the last bit (an elementwise producer recomputed in two fusions need not agree); every
value test's tolerance holds, PyTorch parity included. No JAX import here: workers set this before JAX starts.
"""

OPTIMIZATION = "--xla_backend_optimization_level=0"


def device_count_flag(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices}"


def xla_flags(devices: int) -> str:
  """The XLA_FLAGS of a test subprocess with `devices` simulated CPU devices."""
  return f"{device_count_flag(devices)} {OPTIMIZATION}"
