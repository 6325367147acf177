"""Config keys declared once, the rules their values follow, and the command line's ways to change
them: `--config.KEY=VALUE` overrides and `--config=FILE.py[:ARG]` config files.

Every key is one `Key`: its default, its `Rule` (range or choices), a one-line help and the group
`--help` lists it under. The loop's keys come from `loop.base_keys()`, each method's own from its
`config.KEYS`; `make_config` builds the `ConfigDict`, `rules_of` the rules, `help_text` the listing.
`validate` checks a whole config against its rules before JAX starts, so a bad value ends the run
in one line before anything is created or touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shlex
import textwrap
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

  def accepts(self, value: Any) -> bool:
    """Whether `value` follows the rule (a test that raises TypeError or ValueError refuses it)."""
    try:
      return bool(self.test(value))
    except (TypeError, ValueError):
      return False

  def check(self, key: str, value: Any) -> None:
    if not self.accepts(value):
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
DTYPE = Rule(
  lambda v: v in ("auto", "float32", "bfloat16"),
  "auto, float32 or bfloat16 (float16 would need loss scaling, which the trainer does not do: use bfloat16)",
)
# `--config.remat` (layers.REMAT_POLICIES; true / false: full / none, as configs saved before the names existed).
REMAT = Rule(
  lambda v: v in ("none", "full", "dots", "dots_no_batch") or isinstance(v, bool), "none, full, dots or dots_no_batch"
)


def remat_key() -> Key:
  """The `remat` key every experiment declares (its models apply it per scanned block or per forward)."""
  return Key(
    "none",
    REMAT,
    "activations the backward pass recomputes (less memory, more compute): none, full, dots (keep matmul "
    "outputs), dots_no_batch (keep projections, recompute attention scores)",
    "model",
  )


# `--config.batch_size=max` (any `*batch_size` key): the largest batch that fits, searched by --mode=plan.
MAX_BATCH = -1

Rules = Mapping[str, Rule]


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key, declared once: its `default` (whose type the command line keeps), the `rule` its
  values follow, a one-line `help` and the `group` that `--help` lists it under."""

  default: Any
  rule: Rule
  help: str
  group: str


Keys = Mapping[str, Key]

# What each group holds, for `--help`; a method adds its own (latent diffusion's stage sections).
GROUPS = {
  "loop": "the training loop and optimizer (shared by every experiment)",
  "data": "the data: which dataset, where it lives, how it is read",
  "model": "the model and its inputs",
  "loss": "the training objective",
  "eval": "evaluation of a trained run",
  "sample": "sampling from a trained run",
  "export": "writing a trained run's weights for other libraries",
  "plan": "--mode=plan: the steps compiled for an accelerator target without the device",
}


def make_config(keys: Keys) -> ml_collections.ConfigDict:
  """The `ConfigDict` of `keys`' defaults; a dotted name (`autoencoder.steps`) is a key of a nested
  section (`config.autoencoder.steps`)."""
  config = ml_collections.ConfigDict()
  for name, key in keys.items():
    *parents, leaf = name.split(".")
    node = config
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = key.default
  return config


def rules_of(keys: Keys) -> dict[str, Rule]:
  """The rule of each key, by its dotted name (what `validate` takes)."""
  return {name: key.rule for name, key in keys.items()}


def keys_from(defaults: Mapping[str, Any], rules: Mapping[str, Rule], help: Mapping[str, str], group: str) -> dict:
  """Keys of a module that keeps defaults, rules and help lines in separate mappings (as
  `data.specs` does), one for each name of `defaults` (a name without a help line gets none)."""
  return {name: Key(default, rules[name], help.get(name, ""), group) for name, default in defaults.items()}


def in_section(section: str, keys: Keys) -> dict[str, Key]:
  """`keys` as the keys of a sub-config `section` (`steps` -> `section.steps`), listed in its own group."""
  return {f"{section}.{name}": dataclasses.replace(key, group=section) for name, key in keys.items()}


def show_value(value: Any) -> str:
  """A default as it would be typed after `--config.KEY=` in a shell."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return shlex.quote(value)
  return repr(value)


def help_text(keys: Keys, groups: Mapping[str, str] = GROUPS, width: int = 100) -> str:
  """Every key with its default, help line and rule, by group (in the order the keys are declared;
  `groups` says what each holds), wrapped at `width` columns."""
  by_group: dict[str, list[str]] = {}
  for name, key in keys.items():
    by_group.setdefault(key.group, []).append(name)
  lines = []
  for group, names in by_group.items():
    about = groups.get(group, "")
    lines.append(textwrap.fill(f"{group}:" + (f" {about}" if about else ""), width, subsequent_indent="  "))
    for name in names:
      key = keys[name]
      lines.append(f"  --config.{name}={show_value(key.default)}")
      about = (key.help + ("" if key.help.endswith(".") else ". ") if key.help else "") + f"Expected {key.rule.expect}."
      lines.append(textwrap.fill(about, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def declares(keys: Keys, groups: Mapping[str, str] | None = None) -> Callable:
  """Marks a `get_config` as building `keys` (with `groups`' descriptions), so that the command line
  can list them under `--help` without being told twice."""

  def mark(get_config: Callable) -> Callable:
    get_config.keys = keys
    get_config.groups = {**GROUPS, **(groups or {})}
    return get_config

  return mark


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
  """PATH of a `KIND:PATH` source (e.g. `init_from=minilm:DIR`) whose kind is `kind`, else None. A Hub
  name `hf-hub:ORG/NAME[@REVISION]` is looked up in the local Hugging Face cache: the path of its
  snapshot's `kind` (an open_clip checkpoint, a sentence-transformers folder, a diffusers VAE), None
  when it holds another kind, a UserError when it is not cached."""
  if source.startswith("hf-hub:"):
    from multimodal_jax.convert import hf_hub

    return hf_hub.path_of(source, kind)
  return source.partition(":")[2] if source.startswith(kind + ":") else None


def source_needs(source_key: str, kind: str, key: str, value: Any, what: str) -> Callable[[Any], None]:
  """A relation: a `kind:` source in `source_key` needs `key=value` (the source is `what`)."""

  def relation(config) -> None:
    source = get_dotted(config, source_key)
    if source_path(source, kind) is not None and get_dotted(config, key) != value:
      raise UserError(f"{source_key}={source} is {what} of {key}={value}: set --config.{key}={value}")

  return relation


def flat_keys(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every value of a (nested) config by its dotted name (`autoencoder.steps`)."""
  return dict(_flat(config.to_dict()))


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
  if isinstance(current, int) and key.split(".")[-1].endswith("batch_size") and text.strip() == "max":
    return MAX_BATCH
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
