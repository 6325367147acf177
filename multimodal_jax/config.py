"""Command-line overrides for `ml_collections.ConfigDict`s (`--config.key=value`) and checks of their values."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import ml_collections

from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError


def _parse_value(key: str, text: str, current):
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise UserError(f"--config.{key}={text}: expected true or false")
  if isinstance(current, (int, float)):
    try:
      return type(current)(float(text) if isinstance(current, float) else int(text))
    except ValueError:
      raise UserError(f"--config.{key}={text}: expected a {type(current).__name__}") from None
  return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `["key=value", "a.b=value", ...]` to a copy of `config`, keeping each key's type.

  An unknown key is a UserError naming the closest known keys.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise UserError(f"--config.{item}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = sorted(config.keys())
      close = difflib.get_close_matches(key, known, n=3)
      hint = f"did you mean {', '.join(close)}? " if close else ""
      raise UserError(f"unknown config key {key!r}; {hint}known keys: {', '.join(known)}")
    node[leaf] = _parse_value(key, text, node[leaf])
  return config


def check_divisible(key: str, value: int, mesh) -> None:
  """A one-line UserError unless `value` (a global batch size, config key `key`) splits evenly over the
  mesh's data-parallel devices."""
  size = shd.data_parallel_size(mesh)
  if value % size:
    raise UserError(f"{key}={value} must be divisible by the {size} data-parallel devices of the mesh")
