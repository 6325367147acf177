"""Command-line overrides for `ml_collections.ConfigDict`s (`--config.key=value`) and the declared
rules their values must follow.

Every config key is declared once with a `Rule` (its range or choices) next to its default: the
loop's keys in `loop.base_config()` / `loop.BASE_RULES`, each experiment's own in the experiment.
`validate` checks a whole config against its rules before JAX starts, so a bad value ends the run
in one line before anything is created or touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a config value must be: `test(value)` is true, else `--config.KEY=VALUE: expected WHAT`."""

  test: Callable[[Any], bool]
  expect: str

  def check(self, key: str, value: Any) -> None:
    try:
      ok = bool(self.test(value))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise UserError(f"--config.{key}={_show(value)}: expected {self.expect}")


def _show(value: Any) -> str:
  """A value as the user typed it, or quoted when that would not read as one line."""
  if isinstance(value, str) and value.isprintable():
    return value
  return repr(value)


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


ANY = Rule(lambda v: True, "anything")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "a number >= 0")
FINITE = Rule(_number, "a finite number")
BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str), "text")


def between(low: float, high: float) -> Rule:
  """A finite number in [low, high]."""
  return Rule(lambda v: _number(v) and low <= v <= high, f"a number from {low:g} to {high:g}")


def one_of(*choices: Any) -> Rule:
  return Rule(lambda v: v in choices, "one of " + ", ".join(str(c) for c in choices))


def comma_list_of(*choices: str) -> Rule:
  """A non-empty comma-separated list of names from `choices` (each at most once)."""

  def test(value):
    names = [n.strip() for n in value.split(",") if n.strip()]
    return bool(names) and len(set(names)) == len(names) and all(n in choices for n in names)

  return Rule(test, "a comma list of " + ", ".join(choices))


def existing_path(kind: str = "file", optional: bool = True) -> Rule:
  """A path that exists (`kind` "file" or "dir"); with `optional`, "" (not given) passes too."""
  exists = os.path.isdir if kind == "dir" else os.path.isfile
  what = "directory" if kind == "dir" else "file"
  return Rule(lambda v: (optional and v == "") or (isinstance(v, str) and exists(v)), f"an existing {what}")


def _mesh_ok(spec: str) -> bool:
  shd.parse_mesh_spec(spec)  # raises MeshSpecError with its own one-line message
  return True


MESH = Rule(_mesh_ok, "a mesh spec such as data:-1 or data:4,fsdp:2")
DTYPE = one_of("float32", "bfloat16", "float16")

Rules = Mapping[str, Rule]


def validate(config: ml_collections.ConfigDict, rules: Rules, relations: Sequence[Callable] = ()) -> None:
  """Checks every key of `config` (dotted names for nested dicts) against its rule, then the
  cross-key `relations` (functions of the config that raise UserError).

  A key without a rule is a programming error (ValueError): every key is declared once.
  """
  for key, value in _flat(config.to_dict()):
    if key not in rules:
      raise ValueError(f"config key {key!r} has no declared rule")
    rules[key].check(key, value)
  for relation in relations:
    relation(config)


def source_path(source: str, kind: str) -> str | None:
  """PATH of a `KIND:PATH` source (e.g. `init_from=minilm:DIR`) whose kind is `kind`, else None."""
  return source.partition(":")[2] if source.startswith(kind + ":") else None


def source_needs(source_key: str, kind: str, key: str, value: Any, what: str) -> Callable[[Any], None]:
  """A relation: a `kind:` source in `source_key` needs `key=value` (the source is `what`)."""

  def relation(config) -> None:
    source = get_dotted(config, source_key)
    if source_path(source, kind) is not None and get_dotted(config, key) != value:
      raise UserError(f"{source_key}={source} is {what} of {key}={value}: set --config.{key}={value}")

  return relation


def _flat(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _parse_value(key: str, text: str, current):
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise UserError(f"--config.{key}={_show(text)}: expected true or false")
  if isinstance(current, (int, float)):
    try:
      return type(current)(float(text) if isinstance(current, float) else int(text))
    except ValueError:
      raise UserError(f"--config.{key}={_show(text)}: expected a {type(current).__name__}") from None
  return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `["key=value", "a.b=value", ...]` to a copy of `config`, keeping each key's type.

  An unknown key is a UserError naming the closest known keys.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise UserError(f"--config.{_show(item)}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if (
      not isinstance(node, ml_collections.ConfigDict)
      or leaf not in node
      or isinstance(node[leaf], ml_collections.ConfigDict)
    ):
      known = sorted(k for k, _ in _flat(config.to_dict()))
      close = difflib.get_close_matches(key, known, n=3)
      hint = f"did you mean {', '.join(close)}? " if close else ""
      raise UserError(f"unknown config key {key!r}; {hint}known keys: {', '.join(known)}")  # repr: one line
    node[leaf] = _parse_value(key, text, node[leaf])
  return config


def overridden_keys(overrides: Sequence[str]) -> list[str]:
  """The dotted keys named by `["key=value", ...]`, in order."""
  return [item.partition("=")[0] for item in overrides]


def get_dotted(config: Mapping, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    node = node[part]
  return node


def check_divisible(key: str, value: int, mesh) -> None:
  """A one-line UserError unless `value` (a global batch size, config key `key`) splits evenly over the
  mesh's data-parallel devices."""
  size = shd.data_parallel_size(mesh)
  if value % size:
    raise UserError(f"{key}={value} must be divisible by the {size} data-parallel devices of the mesh")
