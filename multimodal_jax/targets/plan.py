"""Compile a jitted function for a `Target` and report its compile-time plan: what each device would hold
(from XLA's memory analysis) and do (from the optimized HLO, see `hlo.py`), whether it fits in HBM, and a
roofline estimate of the step time. Method-agnostic: any function, shardings and mesh.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError
from multimodal_jax.targets import analysis, ops
from multimodal_jax.targets.spec import GiB, Target

# XLA's Triton GEMM emitter, compiling without a GPU, takes a default tile config without trying it, and
# for a dot whose operand is a transposed [B, T, ...] activation with T not a power of two (e.g. ViT's
# 197 tokens) no tile maps through the transpose: "Couldn't find output tile sizes that satisfy hlo: dot".
# With a GPU the autotuner would drop such configs and fall back to cuBLAS; this does the same.
TRITON_GEMM_FAILURES = ("Couldn't find output tile sizes", "Failed to compute symbolic tile")
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
# libtpu refuses a program that does not fit and says by how much: that is a plan too (fits: False).
TPU_OUT_OF_MEMORY = re.compile(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def mesh_spec_text(mesh_spec: Mapping[str, int] | str | None) -> str:
  """{"data": 4, "fsdp": 2} -> "data:4,fsdp:2" (the form `sharding.make_mesh` reads); None -> "data:-1"."""
  if mesh_spec is None:
    return "data:-1"
  if isinstance(mesh_spec, str):
    return mesh_spec
  return ",".join(f"{axis}:{size}" for axis, size in mesh_spec.items())


def target_mesh(target: Target, mesh_spec: Mapping[str, int] | str | None = None) -> Mesh:
  """The project's (data, fsdp, tensor) mesh over the target's compile-only devices."""
  try:
    return shd.make_mesh(mesh_spec_text(mesh_spec), target.devices())
  except shd.MeshSpecError as e:
    raise UserError(f"--config.target={target.text}: {e}") from None


def _resolve(shardings: Any, mesh: Mesh) -> Any:
  """PartitionSpec leaves -> NamedSharding on `mesh`; a callable is called with the mesh; None stays."""
  if shardings is None:
    return None
  if callable(shardings):
    return shardings(mesh)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s,
    shardings,
    is_leaf=lambda s: isinstance(s, PartitionSpec),
  )


def _target_fields(target: Target, reserve: int | None) -> dict:
  reserve = target.reserve_bytes if reserve is None else reserve
  return {
    "target": target.text,
    "platform": target.platform,
    "devices": target.n_devices,
    "hosts": target.hosts,
    "device_kind": target.device_kind,
    "hbm_gib": target.hbm_bytes / GiB,
    "reserve_gib": reserve / GiB,
  }


def plan_compiled(
  lowered: Any,
  compiled: Any,
  target: Target,
  *,
  compute_dtype: str = "bfloat16",
  compile_s: float | None = None,
  reserve_bytes: int | None = None,
) -> dict:
  """A flat, JSON-able plan of one compiled step on `target`, per device.

  Memory (`compiled.memory_analysis()`): `peak_gib = (arguments + outputs - aliased + temporaries) /
  2**30`; it `fits` when at most `hbm - reserve` (the target's reserve unless `reserve_bytes` is given).
  From the optimized HLO: `attention` kernel, `bf16_flop_fraction` (matmul FLOPs with both operands
  bfloat16 over all matmul FLOPs; None without matmuls), `tflops_per_device` (matmul FLOPs, loops in
  full), `collective_gib` (result bytes per kind), `hbm_gib_accessed` (kernels' operand and result
  bytes). `model_tflops_per_device` is the same count on the program as written (before partitioning,
  rematerialization and fusion) divided by the devices: more executed than written means redundant or
  recomputed work. `step_s_lower_bound` is a roofline estimate, max(compute, memory): bf16 FLOPs at the
  peak (other FLOPs at half of it on GPU, TF32, and at the peak on TPU), HBM bytes at the bandwidth;
  collectives, overlap and kernel efficiency are not modelled, so real steps are slower.
  """
  memory = compiled.memory_analysis()
  args, outs = memory.argument_size_in_bytes, memory.output_size_in_bytes
  alias, temps = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  peak = args + outs - alias + temps
  reserve = target.reserve_bytes if reserve_bytes is None else reserve_bytes
  text = compiled.as_text()
  totals = analysis.analyze(text)
  model_flops = None
  if lowered is not None:
    try:
      model_flops = analysis.analyze(lowered.as_text(dialect="hlo")).flops / target.n_devices
    except Exception:  # noqa: BLE001 - an exotic lowering: no figure rather than a crash
      model_flops = None
  other_rate = target.peak_bf16_flops / (2.0 if target.platform == "gpu" else 1.0)
  compute_s = totals.bf16_flops / target.peak_bf16_flops + (totals.flops - totals.bf16_flops) / other_rate
  memory_s = totals.hbm_bytes / target.hbm_bandwidth
  return {
    **_target_fields(target, reserve),
    "peak_gib": peak / GiB,
    "fits": peak <= target.hbm_bytes - reserve,
    "state_gib": args / GiB,
    "output_gib": outs / GiB,
    "alias_gib": alias / GiB,
    "temp_gib": temps / GiB,
    "compute_dtype": str(compute_dtype),
    "attention": ops.attention_kind(text),
    "bf16_flop_fraction": totals.bf16_flops / totals.flops if totals.flops else None,
    "tflops_per_device": totals.flops / 1e12,
    "model_tflops_per_device": None if model_flops is None else model_flops / 1e12,
    "collective_gib": {k: v / GiB for k, v in sorted(totals.collective_bytes().items())},
    "hbm_gib_accessed": totals.hbm_bytes / GiB,
    "step_s_lower_bound": max(compute_s, memory_s),
    "compile_s": compile_s,
  }


PLAN_KEYS = (
  *("target", "platform", "devices", "hosts", "device_kind", "hbm_gib", "reserve_gib", "peak_gib", "fits"),
  *("state_gib", "output_gib", "alias_gib", "temp_gib", "compute_dtype", "attention", "bf16_flop_fraction"),
  *("tflops_per_device", "model_tflops_per_device", "collective_gib", "hbm_gib_accessed", "step_s_lower_bound"),
  "compile_s",
)


class TargetCompile(NamedTuple):
  """What `compile_for` made: the mesh, JAX's lowered and compiled step (None when a TPU compiler refused
  it for memory: then the plan says `fits: False` and `error`), and the plan."""

  mesh: Mesh
  lowered: Any
  compiled: Any
  plan: dict


def _compile(lowered: Any, target: Target, options: dict | None) -> tuple[Any, dict | None, str]:
  """(compiled or None, the compiler options used, XLA's out-of-memory message when None)."""
  try:
    return lowered.compile(compiler_options=options or None), options, ""
  except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
    message = str(e)
    if target.platform == "gpu" and any(s in message for s in TRITON_GEMM_FAILURES) and not options:
      return lowered.compile(compiler_options=NO_TRITON_GEMM), dict(NO_TRITON_GEMM), ""
    first = next((line for line in message.splitlines() if line.strip()), type(e).__name__)
    if target.platform == "tpu" and TPU_OUT_OF_MEMORY.search(first):
      return None, options, first
    raise UserError(f"--config.target={target.text}: XLA could not compile the step: {first[:300]}") from None


def compile_lowered(lowered: Any, target: Target, options: dict | None = None) -> tuple[Any, dict | None, str]:
  """`(compiled or None, compiler options used, libtpu's out-of-memory message when None)` of a step
  already lowered on the target's mesh, with the same Triton GEMM fallback and TPU memory refusal as
  `compile_for`."""
  return _compile(lowered, target, options)


def plan_out_of_memory(lowered: Any, target: Target, message: str, **kwargs: Any) -> dict:
  """The plan of a step the TPU compiler refused for memory: its temporaries (the compiler's figure, a
  lower bound of the peak) and `fits: False`; the HLO-derived fields are None (nothing was compiled)."""
  temps = float(TPU_OUT_OF_MEMORY.search(message).group(1))
  plan = dict.fromkeys(PLAN_KEYS)
  plan.update(_target_fields(target, kwargs.get("reserve_bytes")), compute_dtype=str(kwargs.get("compute_dtype")))
  plan.update(peak_gib=temps, temp_gib=temps, fits=False, compile_s=kwargs.get("compile_s"), error=message[:300])
  if lowered is not None:
    plan["model_tflops_per_device"] = analysis.analyze(lowered.as_text(dialect="hlo")).flops / target.n_devices / 1e12
  return plan


def compile_for(
  target: Target,
  fn: Callable,
  abstract_args: tuple,
  in_shardings: Any = None,
  out_shardings: Any = None,
  donate_argnums: tuple[int, ...] = (),
  mesh_spec: Mapping[str, int] | str | None = None,
  *,
  compute_dtype: str = "bfloat16",
  compiler_options: dict | None = None,
) -> TargetCompile:
  """Builds the mesh over `target`'s devices, then jits, lowers and compiles `fn` for it.

  `abstract_args` are `jax.ShapeDtypeStruct`s (or arrays); shardings are pytrees of NamedSharding or
  PartitionSpec (placed on the target mesh), or a callable mesh -> shardings. On GPU a step that hits
  XLA's Triton GEMM tiling failure (see TRITON_GEMM_FAILURES) is compiled again with Triton GEMMs off,
  and the plan's `compiler_options` says so.
  """
  mesh = target_mesh(target, mesh_spec)
  jitted = jax.jit(
    fn,
    in_shardings=_resolve(in_shardings, mesh),
    out_shardings=_resolve(out_shardings, mesh),
    donate_argnums=donate_argnums,
  )
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = jitted.lower(*abstract_args)
  lowered_at = time.perf_counter()
  compiled, used, out_of_memory = _compile(lowered, target, compiler_options)
  kwargs = {"compute_dtype": compute_dtype, "compile_s": time.perf_counter() - lowered_at}
  if compiled is None:
    plan = plan_out_of_memory(lowered, target, out_of_memory, **kwargs)
  else:
    plan = plan_compiled(lowered, compiled, target, **kwargs)
  plan["lower_s"] = lowered_at - start
  plan["mesh"] = dict(mesh.shape)
  plan["compiler_options"] = used or {}
  return TargetCompile(mesh, lowered, compiled, plan)
