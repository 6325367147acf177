"""What a train step costs on the device: FLOPs per step, achieved TFLOP/s, MFU, profiler traces and
JAX's persistent compilation cache.

FLOPs come from XLA, not from a per-model formula, so every experiment gets them for free:
- `cost_analysis_flops(compiled)`: XLA's own cost analysis of the compiled step. It counts the body
  of a loop once, so it undercounts layers under a rolled `nn.scan` (one trip of a 24-layer stack
  counts as one layer).
- `hlo_matmul_flops(hlo_text)`: the matmul FLOPs (dots and convolutions, 2 per multiply-add) of an
  HLO module, each loop body counted as many times as the loop runs. `step_flops(lowered)` applies it
  to the step as JAX lowered it (before XLA rewrites dots into library calls on GPU), so it holds on
  every backend and for every unroll setting. This is what `mfu` uses: matmul FLOPs are the model
  FLOPs that MFU is defined by (elementwise work is left out; recomputation under `remat` is in).

Nothing here imports the rest of the package.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Any

import jax

# Dense (no sparsity) peak FLOP/s per device, by compute dtype. "float32" is what a float32 matmul
# runs at under JAX's default precision: TF32 tensor cores on A100 / H100 / H200, bfloat16 MXU passes
# on TPUs (so the same figure as bfloat16). Keys are matched against `device.device_kind`, the
# first match wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
  ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
  ("h100", {"bfloat16": 989e12, "float32": 494e12}),  # SXM / HBM3
  ("h200", {"bfloat16": 989e12, "float32": 494e12}),
  ("a100", {"bfloat16": 312e12, "float32": 156e12}),
  ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
  ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
  ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
  ("tpu v5p", {"bfloat16": 459e12, "float32": 459e12}),
  ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),  # v5p reports itself as "TPU v5"
  ("tpu v6 lite", {"bfloat16": 918e12, "float32": 918e12}),  # v6e (Trillium)
  ("tpu v6e", {"bfloat16": 918e12, "float32": 918e12}),
)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """The table's peak FLOP/s of one device of this kind at this compute dtype; None when unknown
  (every CPU, and accelerators not in PEAK_FLOPS)."""
  kind = device_kind.lower()
  dtype = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}.get(dtype, dtype)
  for name, peaks in PEAK_FLOPS:
    if name in kind:
      return peaks.get(dtype)
  return None


def cost_analysis_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled function per XLA's cost analysis (loop bodies counted once)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_OPERAND = re.compile(r"%?([A-Za-z_][\w.\-]*)")


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
  """`name = TYPE op(operands), attrs` -> (name, type, op, rest after the op's open paren)."""
  head, eq, body = line.strip().partition(" = ")
  if not eq:
    return None
  name = head.removeprefix("ROOT ").strip().lstrip("%")
  if body.startswith("("):  # a tuple type: skip to its matching paren
    depth = 0
    for i, ch in enumerate(body):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    type_str, body = body[: i + 1], body[i + 1 :].lstrip()
  else:
    type_str, _, body = body.partition(" ")
  op, paren, rest = body.partition("(")
  return (name, type_str, op.strip(), rest) if paren else None


def _dims(type_str: str) -> list[int] | None:
  m = _ARRAY.match(type_str)
  return None if m is None else [int(d) for d in m.group(1).split(",") if d]


def _int_set(rest: str, key: str) -> list[int]:
  m = re.search(rf"\b{key}=\{{([\d,]*)\}}", rest)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction (the text up to the op's closing paren)."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += (ch in "([{") - (ch in ")]}")
    if depth == 0:
      end = i
      break
  names = []
  for part in re.split(r",\s*(?![^\[\]{}]*[\]}])", rest[:end]):
    tokens = part.split()
    if tokens:
      m = _OPERAND.fullmatch(tokens[-1])
      if m:
        names.append(m.group(1))
  return names


def _parse_hlo(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str | None]:
  """Computations of an HLO module (name -> its instructions as `_split_instruction` tuples) and
  the name of the entry computation."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if not line.startswith((" ", "\t")) and line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
      m = _HEADER.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
        continue
    if current is not None and line.startswith((" ", "\t")):
      parsed = _split_instruction(line)
      if parsed:
        comps[current].append(parsed)
  return comps, entry


def _hlo_totals(hlo_text: str, cost) -> dict[str, float]:
  """Sums `cost(op, type_str, rest, shapes) -> {key: amount}` over the instructions the entry
  computation runs: into fusions and calls, the costliest branch of a conditional, and each while
  loop's body times its trip count (XLA's `known_trip_count` or, failing that, the constant its
  condition compares the counter against: the form `lax.scan` and `fori_loop` lower to)."""
  comps, entry = _parse_hlo(hlo_text)
  memo: dict[str, dict[str, float]] = {}

  def trip_count(rest: str, condition: str | None) -> int:
    m = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', rest)
    if m:
      return int(m.group(1))
    consts = {}
    for name, _, op, r in comps.get(condition or "", []):
      if op == "constant":
        with contextlib.suppress(ValueError):
          consts[name] = int(r.split(")")[0])
    for _, _, op, r in comps.get(condition or "", []):
      if op == "compare" and ("direction=LT" in r or "direction=GT" in r):
        for operand in _operands(r):
          if operand in consts:
            return consts[operand]
    return 1

  def add(total, part, times=1.0):
    for k, v in part.items():
      total[k] = total.get(k, 0.0) + times * v

  def totals_of(comp: str) -> dict[str, float]:
    if comp in memo:
      return memo[comp]
    memo[comp] = {}  # guards against cycles
    shapes = {name: type_str for name, type_str, _, _ in comps.get(comp, [])}
    total: dict[str, float] = {}
    for _, type_str, op, rest in comps.get(comp, []):
      add(total, cost(op, type_str, rest, shapes))
      if op == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", rest)
        cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
        if body:
          add(total, totals_of(body.group(1)), trip_count(rest, cond.group(1) if cond else None))
      elif op == "conditional":
        listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
        names = listed.group(1).split(",") if listed else re.findall(r"(?:true|false)_computation=([%\w.\-]+)", rest)
        branches = [totals_of(b.strip().lstrip("%")) for b in names]
        if branches:
          add(total, max(branches, key=lambda t: sum(t.values())))
      elif op in ("fusion", "call", "async-start", "custom-call"):
        for called in re.findall(r"\b(?:calls|to_apply)=%?([\w.\-]+)", rest):
          add(total, totals_of(called))
    memo[comp] = total
    return total

  return totals_of(entry) if entry else {}


def _matmul_cost(op: str, type_str: str, rest: str, shapes: dict[str, str]) -> dict[str, float]:
  if op == "dot":
    ops = _operands(rest)
    out, lhs = _dims(type_str), _dims(shapes.get(ops[0], "")) if ops else None
    if out is not None and lhs is not None:
      return {"flops": 2.0 * math.prod(out) * math.prod(lhs[d] for d in _int_set(rest, "lhs_contracting_dims"))}
  elif op == "convolution":
    ops = _operands(rest)
    labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
    out = _dims(type_str)
    rhs = _dims(shapes.get(ops[1], "")) if len(ops) > 1 else None
    if out is not None and rhs is not None and labels and "o" in labels.group(1):
      return {"flops": 2.0 * math.prod(out) * math.prod(rhs) / rhs[labels.group(1).index("o")]}
  elif op == "custom-call" and "fmha" in rest.lower():
    ops = _operands(rest)
    q, k = (_dims(shapes.get(o, "")) for o in ops[:2]) if len(ops) > 1 else (None, None)
    if q is not None and k is not None and len(q) == 4 and len(k) == 4:
      b, t, n, h = q
      return {"flops": (8.0 if "backward" in rest.lower() else 4.0) * b * n * t * k[1] * h}
  return {}


def hlo_matmul_flops(hlo_text: str) -> float:
  """Matmul FLOPs of an HLO module, with loops counted trip-count times.

  Counts `dot` (2 x output size x contracted size), `convolution` (2 x output size x the filter's
  size per output feature) and cuDNN fused attention calls (4 x B N T S H forward, twice that
  backward), through fusions, calls, conditionals and loops (see `_hlo_totals`).
  """
  return _hlo_totals(hlo_text, _matmul_cost).get("flops", 0.0)


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _type_bytes(type_str: str) -> int:
  return sum(
    _BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
    for dt, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", type_str)
  )


def _collective_cost(op: str, type_str: str, rest: str, shapes: dict[str, str]) -> dict[str, float]:
  base = op.removesuffix("-start")
  if base not in COLLECTIVES:
    return {}
  if base == "reduce-scatter":  # what each device sends: its full input
    size = sum(_type_bytes(shapes.get(o, "")) for o in _operands(rest))
  elif op.endswith("-start") and type_str.startswith("("):  # async: (operands, results, ...) tuple
    size = sum(_type_bytes(shapes.get(o, "")) for o in _operands(rest))
    size = size if base != "all-gather" else _type_bytes(type_str) - size
  else:
    size = _type_bytes(type_str)
  return {base: float(size)}


def hlo_collective_bytes(hlo_text: str) -> dict[str, float]:
  """Bytes per device that each kind of collective (COLLECTIVES) moves in one call of a compiled
  SPMD program, loops counted in full: the result size of all-gather, all-reduce, all-to-all and
  collective-permute, the operand size of reduce-scatter. Read `compiled.as_text()`."""
  return _hlo_totals(hlo_text, _collective_cost)


def step_flops(lowered: Any) -> float | None:
  """Matmul FLOPs of one call of a lowered (`jax.jit(f).lower(...)`) function, loops counted in
  full; None when its HLO cannot be read."""
  try:
    text = lowered.as_text(dialect="hlo")
  except Exception:  # noqa: BLE001 - an exotic lowering: no figure rather than a crash
    return None
  return hlo_matmul_flops(text) or None


def throughput_metrics(
  flops_per_step: float | None, steps_per_sec: float, num_devices: int, device_kind: str, dtype: str
) -> dict[str, float]:
  """`tflops_per_sec_per_device` and, where the device kind is in PEAK_FLOPS, `mfu` (a fraction)."""
  if not flops_per_step or not steps_per_sec or not math.isfinite(steps_per_sec):
    return {}
  per_device = flops_per_step * steps_per_sec / max(num_devices, 1)
  out = {"tflops_per_sec_per_device": per_device / 1e12}
  peak = peak_flops(device_kind, dtype)
  if peak:
    out["mfu"] = per_device / peak
  return out


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """ "START:END" -> (START, END), the steps a profiler trace covers (END exclusive); "" -> None.
  Raises ValueError with the expected form otherwise."""
  spec = (spec or "").strip()
  if not spec:
    return None
  start, sep, end = spec.partition(":")
  try:
    window = (int(start), int(end))
  except ValueError:
    window = None
  if not sep or window is None or window[0] < 0 or window[1] <= window[0]:
    raise ValueError(f"profile_steps={spec!r}: give START:END with 0 <= START < END, e.g. 5:8")
  return window


class ProfileWindow:
  """Opens a `jax.profiler` trace before step START and closes it after step END - 1, into
  `logdir` (WORKDIR/profile: TensorBoard's profile plugin and Perfetto read it).

  Call `before(step)` before dispatching a step and `after(step, outputs)` after it; the trace is
  closed once the outputs of its last step are ready, so it covers their device time.
  """

  def __init__(self, spec: str, logdir: str):
    self.window = parse_profile_steps(spec)
    self.logdir = logdir
    self.active = False

  def before(self, step: int) -> None:
    if self.window and step == self.window[0] and not self.active:
      os.makedirs(self.logdir, exist_ok=True)
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, outputs: Any = None) -> None:
    if self.active and step + 1 >= self.window[1]:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


CACHE_ENV = "MMJ_COMPILE_CACHE"


def default_cache_dir() -> str:
  """The user cache dir for compiled programs: $XDG_CACHE_HOME (or ~/.cache)/multimodal_jax/jax_cache."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "multimodal_jax", "jax_cache")


def setup_compile_cache(spec: str = "") -> str | None:
  """Turns on JAX's persistent compilation cache: `spec` a directory, "off" to leave it off, "" for
  $MMJ_COMPILE_CACHE (a directory or "off") when that is set, else `default_cache_dir()`. The
  variable lets a harness (the test suite: tests/conftest.py) keep every run it launches out of the
  user's cache without passing `compile_cache` to each; an explicit `spec` wins over it. Every
  compiled program is kept (no minimum compile time or size), so a second launch of the same
  experiment loads its steps instead of compiling them. Returns the directory, or None when off."""
  spec = (spec or "").strip() or os.environ.get(CACHE_ENV, "").strip()
  if spec.lower() == "off":
    return None
  path = os.path.abspath(os.path.expanduser(spec or default_cache_dir()))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
