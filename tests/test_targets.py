"""Compile-time plans for accelerators this machine does not have (multimodal_jax.targets).

Tests that compile need the `plan` extra's compilers and skip without them: libtpu for TPU targets, the
CUDA PJRT plugin for GPU targets. Shapes are tiny: each compile takes about a second on 2 cores.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from multimodal_jax import targets
from multimodal_jax.errors import UserError
from multimodal_jax.targets import analysis, devices

HAVE_TPU = devices.installed("libtpu")
HAVE_CUDA = devices.installed("jax_plugins.xla_cuda12")
needs_tpu = pytest.mark.skipif(not HAVE_TPU, reason='libtpu not installed (pip install -e ".[plan]")')
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason='CUDA plugin not installed (pip install -e ".[plan]")')
TPU = pytest.param("tpu:v5e:2x4", marks=needs_tpu, id="tpu")
GPU = pytest.param("gpu:h100:8", marks=needs_cuda, id="gpu")
GiB = 2**30


def _sds(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _mlp_step(params, x):
  def loss(p):
    return jnp.mean(jnp.square(jnp.tanh(x @ p["w1"]) @ p["w2"]).astype(jnp.float32))

  value, grads = jax.value_and_grad(loss)(params)
  return jax.tree.map(lambda w, g: w - 0.1 * g.astype(w.dtype), params, grads), value


def _compile_mlp(text):
  target = targets.parse_target(text)
  params = {"w1": _sds((64, 128)), "w2": _sds((128, 16))}
  x = _sds((target.n_devices * 4, 64))
  specs = {"w1": P("fsdp", None), "w2": P("fsdp", None)}
  return target, targets.compile_for(
    target, _mlp_step, (params, x), (specs, P("fsdp")), (specs, P()), (0,), {"fsdp": 8}
  )


@pytest.mark.slow
@pytest.mark.parametrize("text", [TPU, GPU])
def test_train_step_plan_matches_memory_analysis(text):
  # Catches: peak computed from the wrong fields (aliased donated params counted twice, temps left out),
  # a plan for another device kind or host count than the compiler's.
  target, result = _compile_mlp(text)
  plan, memory = result.plan, result.compiled.memory_analysis()
  expected = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
  expected += memory.temp_size_in_bytes
  assert memory.alias_size_in_bytes > 0  # the donated params are aliased
  assert plan["peak_gib"] == pytest.approx(expected / GiB)
  assert plan["fits"] is True
  assert plan["devices"] == 8 and plan["mesh"]["fsdp"] == 8
  devices = target.devices()
  assert plan["device_kind"] == devices[0].device_kind == target.device_kind
  assert plan["hosts"] == len({d.process_index for d in devices})
  assert plan["collective_gib"]["all-gather"] > 0  # FSDP gathers the params
  assert plan["bf16_flop_fraction"] == 1.0 and plan["tflops_per_device"] > 0
  assert plan["compile_s"] > 0 and plan["step_s_lower_bound"] > 0


@pytest.mark.parametrize("text", [TPU, GPU])
@pytest.mark.parametrize(("dtype", "fraction"), [(jnp.bfloat16, 1.0), (jnp.float32, 0.0)])
def test_bf16_flop_fraction(text, dtype, fraction):
  # Catches: float32 matmuls reported as bfloat16 (or the reverse), e.g. by reading the result's dtype.
  target = targets.parse_target(text)
  x, w = _sds((64, 256), dtype), _sds((256, 128), dtype)
  plan = targets.compile_for(target, jnp.dot, (x, w), (P("data"), P()), P("data")).plan
  assert plan["bf16_flop_fraction"] == fraction


@pytest.mark.parametrize("text", [TPU, GPU])
@pytest.mark.parametrize("layers", [1, 5])
def test_flops_of_a_dot_counted_exactly_in_a_scan(text, layers):
  # Catches: a scanned (while-loop) body counted once instead of once per trip, and FLOPs of the whole
  # program instead of one device's share.
  target = targets.parse_target(text)
  m, k, n = 8 * target.n_devices, 256, 128

  def f(x, w):
    return jax.lax.scan(lambda c, wl: (c, jnp.dot(x, wl)), 0.0, w)[1]

  plan = targets.compile_for(target, f, (_sds((m, k)), _sds((layers, k, n))), (P("data"), P()), P(None, "data")).plan
  assert plan["tflops_per_device"] * 1e12 == 2 * (m // target.n_devices) * k * n * layers


@needs_cuda
def test_cudnn_attention_for_h100():
  # Catches: the fused attention kernel not recognised (reported as "xla") or its FLOPs not counted.
  target = targets.parse_target("gpu:h100:8")
  b, s, h, d = 8, 256, 4, 64
  q = _sds((b, s, h, d))

  def f(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

  result = targets.compile_for(target, f, (q, q, q), (P("data"),) * 3, P("data"))
  assert "__cudnn$fmha" in result.compiled.as_text()
  assert result.plan["attention"] == "cudnn"
  assert result.plan["tflops_per_device"] * 1e12 == 4 * (b // 8) * h * s * s * d  # QK^T and PV
  assert result.plan["bf16_flop_fraction"] == 1.0


@needs_cuda
def test_triton_gemm_tiling_failure_falls_back_to_cublas():
  # Catches: a GPU plan of a ViT-like step dying on XLA's deviceless Triton GEMM tiling failure (a
  # transposed attention output with 197 tokens feeding the out-projection).
  target = targets.parse_target("gpu:h100:1")
  probs, values, w = _sds((8, 12, 197, 197)), _sds((8, 197, 12, 64)), _sds((768, 768))

  def out_projection(p, v, w):
    return jnp.einsum("bnts,bsnh->btnh", p, v).reshape(-1, 768) @ w

  result = targets.compile_for(target, out_projection, (probs, values, w))
  try:
    result.lowered.compile()  # XLA's defaults, as a deviceless compile for the H100
    expected = {}
  except Exception as e:  # noqa: BLE001 - XLA's runtime error
    assert "tile sizes" in str(e) or "symbolic tile" in str(e)
    expected = {"xla_gpu_enable_triton_gemm": False}
  assert result.plan["compiler_options"] == expected


@pytest.mark.parametrize("text", [TPU, GPU])
def test_fits_is_false_for_an_absurd_temporary(text):
  # Catches: `fits` compared against the wrong budget, temporaries left out of the peak, and (TPU) a plan
  # that dies with the compiler's out-of-memory refusal instead of saying it does not fit.
  target = targets.parse_target(text)
  a = _sds((2**18,), jnp.float32)  # sorting the outer product: a 256 GiB temporary on each device
  result = targets.compile_for(target, lambda a: jnp.sort(jnp.outer(a, a), axis=0)[:2], (a,), P(), P())
  assert result.plan["temp_gib"] >= 256 > result.plan["hbm_gib"]
  assert result.plan["fits"] is False
  if target.platform == "tpu":  # libtpu refuses it: no executable, the compiler's figure and message
    assert result.compiled is None and "exceeds available HBM" in result.plan["error"]


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("tpu:v9z:2x2", "--config.target=tpu:v9z:2x2: unknown TPU type 'v9z' (known: v4, v5e, v5p, v6e)"),
    ("gpu:h900:8", "--config.target=gpu:h900:8: unknown GPU model 'h900' (known: a100, b200, h100, h200)"),
    ("tpu:v5p:2x2", "has 2 dimensions; this TPU type takes 3"),
    ("tpu:v5e:2by4", "is not positive sizes joined by 'x'"),
    ("gpu:h100:16", "16 GPUs per host; at most 8"),
    ("npu:x:1", "unknown platform 'npu'"),
    ("h100", "expected PLATFORM:MODEL:TOPOLOGY"),
  ],
)
def test_bad_target_is_one_user_error_line(text, message):
  # Catches: a bad --config.target ending in a traceback or a multi-line message instead of one line.
  with pytest.raises(UserError) as raised:
    targets.parse_target(text)
  assert message in str(raised.value) and "\n" not in str(raised.value)


def test_targets_parse_to_their_device_counts():
  # Catches: hosts and devices mixed up in NxHOSTS, v4's two devices per chip forgotten.
  cases = {"gpu:h200:8x8": (64, 8), "gpu:h100:8": (8, 1), "tpu:v5p:4x4x4": (64, 16), "tpu:v4:2x2x2": (16, 2)}
  for text, (n, hosts) in cases.items():
    target = targets.parse_target(text)
    assert (target.n_devices, target.hosts) == (n, hosts), text
    assert 0 < target.reserve_bytes < target.hbm_bytes


def test_missing_compiler_names_the_install(monkeypatch):
  # Catches: a missing libtpu / CUDA plugin surfacing as an import traceback instead of the fix, also where no
  # PJRT plugin at all is installed: then find_spec("jax_plugins.xla_cuda12") raises, it does not return None
  def no_plugins(name, *args):
    if "." in name:
      raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

  for find_spec in (lambda name, *a: None, no_plugins):
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for text in ("tpu:v5e:2x4", "gpu:h100:8"):
      with pytest.raises(UserError, match=r'pip install -e "\.\[plan\]"'):
        targets.require_compiler(targets.parse_target(text))


SCANNED_ALL_GATHER = """
HloModule m, entry_computation_layout={(bf16[4,8]{1,0})->bf16[32,8]{1,0}}

%start (p0: bf16[4,8]) -> bf16[32,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[32,8]{1,0} all-gather(bf16[4,8]{1,0} %p0), channel_id=7, dimensions={0}
}

%done (p1: bf16[4,8]) -> bf16[32,8] {
  %p1 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[32,8]{1,0} all-gather(bf16[4,8]{1,0} %p1), channel_id=7, dimensions={0}
}

%body (t: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0} get-tuple-element(%t), index=1
  %a = bf16[32,8]{1,0} fusion(%x), kind=kCustom, calls=%start
  %b = bf16[32,8]{1,0} fusion(%x), kind=kCustom, calls=%done
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %x)
}

%cond (c: (s32[], bf16[4,8])) -> pred[] {
  %c = (s32[], bf16[4,8]{1,0}) parameter(0)
  %n = s32[] constant(3)
  %j = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (x: bf16[4,8]) -> bf16[4,8] {
  %x = bf16[4,8]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], bf16[4,8]{1,0}) tuple(%z, %x)
  %w = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %o = bf16[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_deduplicated_by_channel_and_counted_per_trip():
  # Catches: a TPU async collective (one channel shown in its start and done fusions) counted twice; a
  # loop body without a known trip count counted once (the trip count is read from its condition).
  totals = analysis.analyze(SCANNED_ALL_GATHER)
  assert totals.collective_bytes() == {"all-gather": 3 * 32 * 8 * 2}


@pytest.mark.slow
@needs_cuda
def test_gpu_target_after_jax_started_without_the_cuda_plugin():
  # Catches: "topology not implemented for cuda" when JAX started before JAX_PLATFORMS or the CUDA
  # check skip were set (its plugin then never registered on a GPU-less machine).
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}
  env["TPU_SKIP_MDS_QUERY"] = "1"
  code = (
    "import jax; jax.devices()\n"
    "from multimodal_jax import targets\n"
    "print(len(targets.parse_target('gpu:h100:2').devices()), jax.default_backend())\n"
  )
  out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-2:] == ["2", "cpu"]
