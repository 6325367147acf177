"""What one call of a compiled program does per device, read from its optimized HLO (`compiled.as_text()`).

The compiled module is the program one device runs (SPMD), so everything here is per device:
- matmul FLOPs (2 per multiply-add), split by whether both operands are bfloat16: `dot`s (on GPU inside
  Triton fusions), `convolution`s (TPUs express every matmul as one), cuBLAS GEMM and cuDNN convolution
  and fused-attention library calls;
- result bytes of each collective, once per logical collective: a TPU async collective shows the same
  op (same channel, kind and shape) in its start, overlap and done fusions. Channel ids alone are not
  unique: an optimized GPU module reuses one for unrelated collectives;
- bytes that kernels read and write in HBM (each kernel's operands and results, slices of stacked
  operands counted as the slice), for the roofline estimate.
Each while loop's body counts as many times as it runs (XLA's known trip count or the constant its
condition compares against: the form `lax.scan` and `fori_loop` take), so scanned layers count in full;
of a conditional's branches the one with the most FLOPs counts.
"""

from __future__ import annotations

import dataclasses
import re

from multimodal_jax.targets.hlo import Instr, arrays, parse_module, type_bytes
from multimodal_jax.targets.ops import COLLECTIVES, collective, matmul_flops

_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call"}
_NO_TRAFFIC |= {"after-all", "partition-id", "replica-id", "opt-barrier", "async-done", "async-update", "copy-done"}


@dataclasses.dataclass
class Totals:
  """Per-device work of a computation; `keyed` holds collectives not yet multiplied by a loop."""

  flops: float = 0.0
  bf16_flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: dict[str, float] = dataclasses.field(default_factory=dict)
  keyed: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)

  def add(self, other: Totals, times: float = 1.0) -> None:
    """Adds `other` run `times` times; times == 1 keeps it in this scope (its collectives deduplicate)."""
    self.flops += times * other.flops
    self.bf16_flops += times * other.bf16_flops
    self.hbm_bytes += times * other.hbm_bytes
    for kind, size in other.collectives.items():
      self.collectives[kind] = self.collectives.get(kind, 0.0) + times * size
    if times == 1.0:
      self.keyed.update(other.keyed)
    else:
      for kind, size in other.keyed.values():
        self.collectives[kind] = self.collectives.get(kind, 0.0) + times * size

  def collective_bytes(self) -> dict[str, float]:
    out = dict(self.collectives)
    for kind, size in self.keyed.values():
      out[kind] = out.get(kind, 0.0) + size
    return out


def _bound_trip_count(ins: Instr, comps: dict[str, list[Instr]]) -> int:
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', ins.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"\bcondition=%?([\w.\-]+)", ins.attrs)
  body = comps.get(cond.group(1), []) if cond else []
  consts = {i.name: i.operands[0] for i in body if i.op == "constant" and i.operands}
  for i in body:
    if i.op == "compare" and re.search(r"direction=(LT|GT|NE)", i.attrs):
      for name in i.operands:
        if consts.get(name, "").lstrip("-").isdigit():
          return abs(int(consts[name]))
  return 1


def _trip_count(ins: Instr, comps: dict[str, list[Instr]]) -> int:
  """A while loop's trip count: XLA's known_trip_count, else the bound in its condition, divided by the loop
  counter's step when the count is a guess from the condition's constant: libtpu's windowed einsum loops
  (FSDP's all-gather / reduce-scatter matmuls) are unrolled twice and count 0, 2, ... < 4, which the plain
  guess takes for 4 trips."""
  n = _bound_trip_count(ins, comps)
  if re.search(r'"known_trip_count"', ins.attrs):
    return n
  cond = re.search(r"\bcondition=%?([\w.\-]+)", ins.attrs)
  body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
  cond_ops, body_ops = comps.get(cond.group(1) if cond else "", []), comps.get(body.group(1) if body else "", [])
  by_name = {i.name: i for i in cond_ops}
  compare = next((i for i in cond_ops if i.op == "compare"), None)
  counter = next((by_name.get(o) for o in (compare.operands if compare else []) if o in by_name), None)
  index = (
    re.search(r"index=(\d+)", counter.attrs) if counter is not None and counter.op == "get-tuple-element" else None
  )
  if not index or not body_ops or body_ops[-1].op != "tuple" or len(body_ops[-1].operands) <= int(index.group(1)):
    return n
  body_by = {i.name: i for i in body_ops}
  update = body_by.get(body_ops[-1].operands[int(index.group(1))])
  if update is None or update.op != "add":
    return n
  steps = [body_by[o].operands[0] for o in update.operands if o in body_by and body_by[o].op == "constant"]
  step = int(steps[0]) if steps and steps[0].lstrip("-").isdigit() else 1
  return -(-n // step) if step > 1 else n


def _kernel_bytes(ins: Instr, comps: dict[str, list[Instr]], shape_of) -> float:
  """HBM bytes a top-level op reads and writes; a fusion that only slices an operand (a scanned layer's
  weights from the stacked array) reads the slice, one whose root updates a slice in place writes it."""
  if ins.op in _NO_TRAFFIC or ins.op.endswith(("-start", "-done")) or ins.op in COLLECTIVES:
    return 0.0
  sizes = [type_bytes(shape_of(o)) for o in ins.operands]
  written = type_bytes(ins.type)
  called = re.search(r"\bcalls=%?([\w.\-]+)", ins.attrs)
  if ins.op == "fusion" and called and called.group(1) in comps:
    body = comps[called.group(1)]
    for i in body:
      if i.op != "parameter" or not i.operands or not i.operands[0].isdigit() or int(i.operands[0]) >= len(sizes):
        continue
      users = [u for u in body if i.name in u.operands]
      if users and all(u.op in ("dynamic-slice", "slice") for u in users):
        sizes[int(i.operands[0])] = sum(type_bytes(u.type) for u in users)
    root = body[-1] if body else None
    if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
      update = next((u.type for u in body if u.name == root.operands[1]), "")
      written = type_bytes(update)
  return float(sum(sizes) + written)


def analyze(text: str) -> Totals:
  """Per-device totals of one call of the module in `text` (see the module docstring)."""
  comps, entry = parse_module(text)
  types = {i.name: i.type for body in comps.values() for i in body}
  memo: dict[tuple[str, bool], Totals] = {}

  def totals_of(comp: str, kernels: bool) -> Totals:
    """`kernels`: the computation's ops are kernels (entry, loop bodies, calls), not a fusion's insides."""
    key = (comp, kernels)
    if key in memo:
      return memo[key]
    memo[key] = total = Totals()  # also guards against cycles
    for ins in comps.get(comp, []):
      flops, bf16 = matmul_flops(ins, lambda n: types.get(n, ""))
      total.flops += flops
      total.bf16_flops += flops if bf16 else 0.0
      if kernels:
        total.hbm_bytes += _kernel_bytes(ins, comps, lambda n: types.get(n, ""))
      coll = collective(ins, lambda n: types.get(n, ""))
      if coll is not None:
        channel = re.search(r"\bchannel_id=(\d+)", ins.attrs)
        same = f"{channel.group(1)} {coll[0]} {arrays(ins.type)}" if channel else ins.name
        total.keyed[same] = coll
      if ins.op == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
        if body:
          total.add(totals_of(body.group(1), True), float(_trip_count(ins, comps)))
      elif ins.op == "conditional":
        names = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        listed = names.group(1).split(",") if names else re.findall(r"_computation=%?([\w.\-]+)", ins.attrs)
        branches = [totals_of(b.strip().lstrip("%"), True) for b in listed]
        if branches:
          total.add(max(branches, key=lambda t: t.flops))
      elif ins.op == "call":
        for called in re.findall(r"\bto_apply=%?([\w.\-]+)", ins.attrs):
          total.add(totals_of(called, kernels))
      elif ins.op in ("fusion", "async-start", "custom-call"):
        for called in re.findall(r"\bcalls=%?([\w.\-]+)", ins.attrs):
          total.add(totals_of(called, False))
    return total

  return totals_of(entry, True) if entry else Totals()
