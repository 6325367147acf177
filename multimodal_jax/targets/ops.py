"""What single HLO instructions do: matmul FLOPs of dots, convolutions and library calls (cuBLAS GEMMs,
cuDNN convolutions and fused attention), the result bytes of collectives, and which attention kernel a
compiled program calls.
"""

from __future__ import annotations

import functools
import json
import math
import re

from multimodal_jax.targets.hlo import DTYPE_BYTES, Instr, arrays, close_bracket

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _json_attr(attrs: str, key: str) -> dict:
  """A key's object inside the instruction's backend_config JSON ({} when absent or unreadable)."""
  m = re.search(r"backend_config=(\{.*\})", attrs)
  if not m:
    return {}
  text = m.group(1)
  try:
    config = json.loads(text[: close_bracket(text, 1) + 1])
  except ValueError:
    return {}
  stack = [config]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      if key in node:
        return node[key]
      stack.extend(node.values())
  return {}


def _ints(attrs: str, key: str) -> list[int]:
  m = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _conv_flops(out_dims: list[int], kernel: list[int], attrs: str) -> float:
  labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
  if not labels or "o" not in labels.group(1) or len(kernel) != len(labels.group(1)):
    return 0.0
  return 2.0 * math.prod(out_dims) * math.prod(kernel) / kernel[labels.group(1).index("o")]


@functools.cache
def _taps(n_in: int, k: int, n_out: int, stride: int, lo: int, lhs_d: int, rhs_d: int) -> int:
  """(output position, window tap) pairs of one spatial dim whose tap meets input data, not padding or a
  dilation hole."""
  span = (n_in - 1) * lhs_d + 1
  return sum(
    1 for o in range(n_out) for t in range(k) if 0 <= (x := o * stride + t * rhs_d - lo) < span and x % lhs_d == 0
  )


def _conv_flops_by_taps(ins: Instr, shape_of, flops: float, bf16: bool) -> tuple[float, bool]:
  """A convolution's FLOPs counted tap by tap: libtpu writes batched matmuls and projections
  as convolutions whose windows span batch or feature dims (attention's [batch, heads] with `lhs_dilate`
  equal to the window, QKV's [3, heads] as a window over padding), where one tap per output meets data;
  the plain count multiplies by the whole window (x6,144 for ViT-B/16's 512 x 12 at 512 images a device)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if ins.op != "convolution" or not flops or not labels or len(ins.operands) < 2:
    return flops, bf16
  shapes = [arrays(t) for t in (shape_of(ins.operands[0]), shape_of(ins.operands[1]), ins.type)]
  if not all(shapes):
    return flops, bf16
  lhs, rhs, out = (a[0][1] for a in shapes)
  lhs_l, rhs_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  fields = dict(f.split("=", 1) for f in window.group(1).split() if "=" in f) if window else {}

  def field(name: str, n: int, default: int) -> list:
    text = fields.get(name)
    return [default] * n if not text else text.split("x")

  digits = [c for c in out_l if c.isdigit()]
  n = len(digits)
  strides = field("stride", n, 1)
  pads, lhs_ds, rhs_ds = field("pad", n, "0_0"), field("lhs_dilate", n, 1), field("rhs_dilate", n, 1)
  taps = 1
  for j, d in enumerate(sorted(digits)):
    lo = int(str(pads[j]).split("_")[0])
    taps *= _taps(
      lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out[out_l.index(d)], int(strides[j]), lo, int(lhs_ds[j]), int(rhs_ds[j])
    )
  return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps, bf16


def matmul_flops(ins: Instr, shape_of) -> tuple[float, bool]:
  """(FLOPs, both operands bfloat16) of a matmul-like instruction; (0, False) for anything else."""
  ops = [arrays(shape_of(o)) for o in ins.operands]
  ops = [a[0] if a else ("", []) for a in ops]
  out = arrays(ins.type)
  if not out or len(ops) < 2:
    return 0.0, False
  bf16 = ops[0][0] == ops[1][0] == "bf16"
  target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
  target = target.group(1) if target else ""
  if ins.op == "dot":
    return 2.0 * math.prod(out[0][1]) * math.prod(ops[0][1][d] for d in _ints(ins.attrs, "lhs_contracting_dims")), bf16
  if ins.op == "convolution":
    return _conv_flops_by_taps(ins, shape_of, _conv_flops(out[0][1], ops[1][1], ins.attrs), bf16)
  if ins.op != "custom-call":
    return 0.0, False
  if target.startswith("__cublas$"):  # GEMM library calls: (result, workspace)
    dims = _json_attr(ins.attrs, "dot_dimension_numbers").get("lhs_contracting_dimensions", [])
    return 2.0 * math.prod(out[0][1]) * math.prod(ops[0][1][int(d)] for d in dims), bf16
  if target.startswith("__cudnn$fmha"):  # fused attention: [B, H, Sq, Sk] scores, D from Q's contraction
    scores = [int(d) for d in _json_attr(ins.attrs, "intermediate_tensor_shape").get("dimensions", [])]
    dim = _json_attr(ins.attrs, "bmm1_dot_dimension_numbers").get("lhs_contracting_dimensions", [])
    head = ops[0][1][int(dim[0])] if dim else (ops[0][1][-1] if ops[0][1] else 0)
    gemms = 5 if "Backward" in target else 2  # forward: QK^T and PV; backward: QK^T again, dV, dP, dQ, dK
    return 2.0 * gemms * math.prod(scores) * head, bf16
  if target.startswith("__cudnn$conv"):  # labels describe the forward convolution
    if "BackwardFilter" in target:
      return _conv_flops(ops[1][1], out[0][1], ins.attrs), bf16
    fwd_out = ops[0][1] if "BackwardInput" in target else out[0][1]
    return _conv_flops(fwd_out, ops[1][1], ins.attrs), bf16
  return 0.0, False


def collective(ins: Instr, shape_of) -> tuple[str, int] | None:
  """(kind, result bytes) of a collective instruction (the start of an async one)."""
  kind = ins.op.removesuffix("-start")
  if kind not in COLLECTIVES:
    return None
  results = arrays(ins.type)
  if ins.op.endswith("-start") and ins.type.startswith("("):  # (operands, results, [context...])
    n = len(ins.operands)
    results = results[n : 2 * n] if len(results) >= 2 * n else results
  return kind, sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in results)


def custom_call_targets(text: str) -> set[str]:
  return set(re.findall(r'custom_call_target="([^"]+)"', text))


def attention_kind(text: str) -> str:
  """The attention kernel a compiled program uses: "cudnn" (cuDNN fused attention), "pallas:NAME" (a
  Pallas kernel named like attention: splash or flash attention on TPU, Triton or Mosaic on GPU) or
  "xla" (attention, if any, as XLA's own dots and softmax)."""
  targets = custom_call_targets(text)
  if any(t.startswith("__cudnn$fmha") for t in targets):
    return "cudnn"
  kernels = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2", "triton_kernel_call")
  for line in text.splitlines():
    if "custom-call(" in line and any(f'custom_call_target="{k}"' in line for k in kernels):
      names = re.findall(r'"(?:name|kernel_name)"\s*:\s*"([^"]+)"', line) + re.findall(r'\bname="([^"]+)"', line)
      for name in names:
        if re.search(r"splash|flash|attention|mha|fmha", name, re.IGNORECASE):
          return f"pallas:{name}"
  return "xla"
