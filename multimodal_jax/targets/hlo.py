"""Reading XLA's HLO text (`compiled.as_text()`, `lowered.as_text(dialect="hlo")`): computations, their
instructions (name, result type, opcode, operands, attributes) and the arrays and bytes of a type.

Works on both the older text form (operands printed with their types) and the newer one (names only).
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2}
DTYPE_BYTES |= {"s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[({]")


@dataclasses.dataclass
class Instr:
  """One HLO instruction: name, result type text, opcode, operand names and the attribute text."""

  name: str
  type: str
  op: str
  operands: list[str]
  attrs: str


def arrays(type_text: str) -> list[tuple[str, list[int]]]:
  """(dtype, dims) of every array in a type (a tuple type has several)."""
  return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(type_text)]


def type_bytes(type_text: str) -> int:
  return sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in arrays(type_text))


def close_bracket(text: str, start: int) -> int:
  """Index of the bracket closing the one opened just before `start`."""
  depth = 1
  for i in range(start, len(text)):
    depth += (text[i] in "([{") - (text[i] in ")]}")
    if depth == 0:
      return i
  return len(text)


def _split_top(text: str) -> list[str]:
  parts, depth, last = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      parts.append(text[last:i])
      last = i + 1
  parts.append(text[last:])
  return [p.strip() for p in parts if p.strip()]


def parse_instr(line: str) -> Instr | None:
  head, eq, body = line.strip().partition(" = ")
  if not eq:
    return None
  name = head.removeprefix("ROOT ").strip().lstrip("%")
  if body.startswith("("):  # a tuple type
    end = close_bracket(body, 1)
    type_text, body = body[: end + 1], body[end + 1 :].lstrip()
  else:
    type_text, _, body = body.partition(" ")
  op, paren, rest = body.partition("(")
  if not paren:
    return None
  end = close_bracket(rest, 0)
  operands = [p.split()[-1].lstrip("%") for p in _split_top(re.sub(r"/\*.*?\*/", "", rest[:end]))]
  return Instr(name, type_text, op.strip(), operands, rest[end + 1 :])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str | None]:
  """Computations (name -> instructions) of an HLO module's text and the entry computation's name."""
  comps: dict[str, list[Instr]] = {}
  entry = current = None
  for line in text.splitlines():
    if line[:1] not in (" ", "\t"):
      m = _HEADER.match(line) if line.rstrip().endswith("{") else None
      current = m.group(2) if m else None
      if m:
        comps[current] = []
        entry = current if m.group(1) else entry
    elif current is not None and (ins := parse_instr(line)) is not None:
      comps[current].append(ins)
  return comps, entry
