"""Accelerator targets: compile a jitted step for a TPU slice or GPU hosts that this machine does not have,
and report its compile-time plan (memory per device and whether it fits, matmul FLOPs and their dtype,
collectives, the attention kernel, a roofline step time).

  target = parse_target("tpu:v5p:2x2x2")            # or "gpu:h100:8", "gpu:h200:8x8"
  result = compile_for(target, step, abstract_args, in_shardings, out_shardings, (0,), {"fsdp": 8})
  result.plan["peak_gib"], result.plan["fits"]

Needs the compilers of the `plan` extra (libtpu, the CUDA PJRT plugin): `pip install -e ".[plan]"`.
A process that only plans should call `prepare_environment()` before JAX starts (see `devices.py`).
"""

from multimodal_jax.targets.analysis import analyze
from multimodal_jax.targets.devices import (
  compiler_version,
  prepare_environment,
  require_compiler,
  spec_text,
  target_devices,
)
from multimodal_jax.targets.ops import attention_kind
from multimodal_jax.targets.plan import (
  TargetCompile,
  compile_for,
  compile_lowered,
  mesh_spec_text,
  plan_compiled,
  plan_out_of_memory,
  target_mesh,
)
from multimodal_jax.targets.spec import GPU_CHIPS, TPU_CHIPS, Target, parse_target

__all__ = [
  "GPU_CHIPS",
  "TPU_CHIPS",
  "Target",
  "TargetCompile",
  "analyze",
  "attention_kind",
  "compile_for",
  "compile_lowered",
  "compiler_version",
  "mesh_spec_text",
  "parse_target",
  "plan_compiled",
  "plan_out_of_memory",
  "prepare_environment",
  "require_compiler",
  "spec_text",
  "target_devices",
  "target_mesh",
]
