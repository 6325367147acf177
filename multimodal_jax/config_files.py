"""`--config=FILE.py[:ARG]`: an ml_collections-style config file (`get_config()` or `get_config(arg)`) read
as the base of a run's config, each of its values checked like a command-line override."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from multimodal_jax.config import Rules, _flat, _show
from multimodal_jax.errors import UserError


def load_config_file(spec: str) -> dict:
  """The values of `--config=FILE.py[:ARG]`: what FILE's `get_config(ARG)`, or `get_config()` without
  `:ARG`, returns (a ConfigDict or dict), as big_vision's and flax's config files define it.

  A missing file, a syntax error, no `get_config` or an argument it does not take is a UserError.
  """
  path, arg = spec, None
  if not os.path.isfile(spec) and ".py:" in spec:
    stem, _, arg = spec.partition(".py:")
    path = stem + ".py"
  if not os.path.isfile(path):
    raise UserError(f"--config={spec}: no such file {path}; expected --config=FILE.py[:ARG]")
  module_spec = importlib.util.spec_from_file_location("_user_config_file", path)
  if module_spec is None or module_spec.loader is None:
    raise UserError(f"--config={spec}: {path} is not a Python file; expected --config=FILE.py[:ARG]")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"--config={spec}: {path} line {e.lineno}: {e.msg}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UserError(f"--config={spec}: {path} defines no get_config(); a config file returns its config from it")
  args = () if arg is None else (arg,)
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    fix = "add :ARG after the file name" if arg is None else "drop the :ARG after the file name"
    raise UserError(
      f"--config={spec}: {path}'s get_config{inspect.signature(get_config)} does not take it so: {fix}"
    ) from None
  values = get_config(*args)
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise UserError(f"--config={spec}: get_config() returned a {type(values).__name__}, not a ConfigDict or dict")
  return dict(values)


def apply_config_file(
  config: ml_collections.ConfigDict, values: Mapping, source: str, rules: Rules
) -> tuple[ml_collections.ConfigDict, list[str]]:
  """`(config with the values of a config file, the dotted keys it set)`. The file may set some keys
  or all of them; one it does not know, a value of another type or one its rule refuses is a one-line
  UserError naming `source` (`--config=FILE`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  known = dict(_flat(config.to_dict()))
  given = []
  for key, value in _flat(dict(values)):
    if key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=3)
      hint = f"did you mean {', '.join(close)}? " if close else ""
      raise UserError(f"{source}: unknown config key {key!r}; {hint}known keys: {', '.join(sorted(known))}")
    value = _file_value(source, key, value, known[key])
    if key in rules and not rules[key].accepts(value):
      raise UserError(f"{source}: {key}={_show(value)}: expected {rules[key].expect}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
    given.append(key)
  return config, given


def _file_value(source: str, key: str, value: Any, current: Any) -> Any:
  """A config file's `value` of `key` in the type of the default `current` (an integral float for an
  int, e.g. `steps = 1e4`; an int for a float)."""
  if isinstance(current, bool):
    ok, what = isinstance(value, bool), "true or false"
  elif isinstance(current, int):
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
  elif isinstance(current, float):
    ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    value = float(value) if ok else value
  elif isinstance(current, str):
    ok, what = isinstance(value, str), "text"
  else:
    ok, what = True, ""
  if not ok:
    raise UserError(f"{source}: {key}={_show(value)}: expected {what}")
  return value
