"""A `Target` (the accelerator slice `spec.parse_target` reads from its text) and its compile-only devices: what `jax.jit(...).lower(...).compile()` compiles for when the
accelerator is not on this machine.

- TPU: libtpu (from `jax[tpu]`) describes a slice from its type and chip grid.
- GPU: the CUDA PJRT plugin describes a GPU from a `stream_executor.GpuTargetConfigProto` text, our
  `specs/<model>.txtpb`, and a `1xHOSTSxN` topology.

The CUDA plugin registers itself when JAX starts its backends, and only if its CUDA version check
passes; on a machine with no GPU that check fails unless JAX_PLATFORMS names platforms without CUDA or
JAX_SKIP_CUDA_CONSTRAINTS_CHECK is set. `prepare_environment()` sets both before JAX starts (for a
process that only plans); `target_devices()` also registers the plugin late when JAX started without
them, so a plan works from any process, at the cost of JAX's one logged plugin error at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
from importlib import resources

from multimodal_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Target:
  """An accelerator slice to compile for, without the accelerator.

  `topology` is the TPU's chip grid ("2x2x2") or, for GPUs, "GPUSxHOSTS" ("8x1"). Memory, FLOP/s and
  bandwidth are per device. `reserve_bytes` is HBM a program may not use (see the reserves above):
  a program fits when its peak is at most `hbm_bytes - reserve_bytes`.
  """

  text: str  # as the user gave it
  platform: str  # "tpu" | "gpu"
  model: str  # "v5p", "h100", ...
  topology: str
  n_devices: int
  hosts: int
  device_kind: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bandwidth: float
  reserve_bytes: int

  @property
  def budget_bytes(self) -> int:
    """HBM a program may use per device: `hbm_bytes - reserve_bytes`."""
    return self.hbm_bytes - self.reserve_bytes

  def devices(self) -> list:
    """The target's compile-only devices (built once per process; needs the `plan` extra)."""
    return target_devices(self)


INSTALL = 'pip install -e ".[plan]"'
SKIP_CUDA_CHECK = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
# libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) when it loads, so a second process on the
# machine fails ("Internal error when accessing libtpu multi-process lockfile"). Compile-only devices
# touch no chip: planning processes may share the machine.
SHARE_LIBTPU = "ALLOW_MULTIPLE_LIBTPU_LOAD"
CHIPS_PER_HOST = 4  # libtpu's default host: a 2x2x1 block of chips


def prepare_environment() -> None:
  """For a process that compiles for targets and runs nothing on an accelerator: call before JAX starts
  its backends (importing JAX is fine). Runs JAX on the CPU (no TPU runtime probing for a local chip,
  no GPU initialisation) and lets the CUDA plugin register on a machine without a GPU. A JAX_PLATFORMS
  that is already set is left alone."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault(SKIP_CUDA_CHECK, "1")
  os.environ.setdefault(SHARE_LIBTPU, "1")
  import jax

  if not jax.config.jax_platforms:  # JAX read its environment when imported, before the line above
    with contextlib.suppress(Exception):  # backends already started: too late, `target_devices` copes
      jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def installed(module: str) -> bool:
  """Whether `module` (dotted names too) can be imported. `find_spec` of "a.b" raises when package "a" itself
  is missing, as the namespace package `jax_plugins` is where no PJRT plugin is installed."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def require_compiler(target: Target) -> None:
  """Raises UserError naming the install command when the target's compiler package is missing."""
  if target.platform == "tpu":
    missing = not installed("libtpu")
    what = "libtpu (jax[tpu])"
  else:
    missing = not installed("jax_plugins.xla_cuda12")
    what = "the CUDA plugin (jax-cuda12-plugin, jax-cuda12-pjrt)"
  if missing:
    raise UserError(f"--config.target={target.text}: compiling for it needs {what}: {INSTALL}")


def spec_text(model: str) -> str:
  """Our GpuTargetConfigProto text for a GPU model (package data `specs/<model>.txtpb`)."""
  return resources.files("multimodal_jax.targets").joinpath("specs", f"{model}.txtpb").read_text()


def _one_line(target: Target, err: Exception) -> UserError:
  first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
  return UserError(f"--config.target={target.text}: the compiler refused it: {first.strip()[:300]}")


def _tpu_devices(target: Target) -> list:
  from jax.experimental import topologies

  os.environ.setdefault(SHARE_LIBTPU, "1")  # read when libtpu loads (the first TPU topology)
  dims = [int(d) for d in target.topology.split("x")]
  kwargs = {}
  if math.prod(dims) < CHIPS_PER_HOST:  # smaller than libtpu's default host: the whole slice is one host
    kwargs["chips_per_host_bounds"] = dims + [1] * (3 - len(dims))
  try:
    return list(topologies.get_topology_desc(f"{target.model}:{target.topology}", "tpu", **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - libtpu says why in its message: pass it on in one line
    raise _one_line(target, e) from None


def _register_cuda_plugin() -> None:
  """Registers the CUDA plugin after JAX started without it (its version check failed: no GPU here)."""
  os.environ.setdefault(SKIP_CUDA_CHECK, "1")
  import jax_plugins.xla_cuda12 as cuda_plugin

  cuda_plugin.initialize()


def _gpu_devices(target: Target) -> list:
  from jax.experimental import topologies

  per_host = target.n_devices // target.hosts
  text = spec_text(target.model)

  def describe():
    return topologies.get_topology_desc(
      target.model, "cuda", target_config=text, topology=f"1x{target.hosts}x{per_host}"
    )

  try:
    try:
      return list(describe().devices)
    except NotImplementedError:  # "topology not implemented for cuda": the plugin is not registered
      _register_cuda_plugin()
      return list(describe().devices)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001
    raise _one_line(target, e) from None


@functools.cache
def _devices(target: Target) -> tuple:
  require_compiler(target)
  devices = _tpu_devices(target) if target.platform == "tpu" else _gpu_devices(target)
  if len(devices) != target.n_devices:
    raise UserError(
      f"--config.target={target.text}: the compiler describes {len(devices)} devices, not {target.n_devices}"
    )
  return tuple(devices)


def target_devices(target: Target) -> list:
  """The compile-only devices of `target`, built once per process and target."""
  return list(_devices(target))


def compiler_version(target: Target) -> str:
  """The compiler a plan came from: libtpu's version for TPU, the CUDA plugin's (with jaxlib's XLA) for GPU."""
  from importlib import metadata

  import jaxlib

  package = "libtpu" if target.platform == "tpu" else "jax-cuda12-plugin"
  try:
    version = metadata.version(package)
  except metadata.PackageNotFoundError:
    version = "unknown"
  return f"{package} {version}, jaxlib {jaxlib.__version__}"
