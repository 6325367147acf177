"""The trainer's keys, shared by every experiment (`base_keys`: each with its default, rule and help;
`SECTION_KEYS` may live in a training stage's sub-config), the cross-key batch checks, the frozen
`LoopConfig` that `loop.fit` reads, and `dtype=auto`'s resolution per platform."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from multimodal_jax import metrics as mt
from multimodal_jax import profiling
from multimodal_jax import sharding as shd
from multimodal_jax.config import (
  DTYPE,
  MAX_BATCH,
  MESH,
  NON_NEGATIVE,
  POSITIVE,
  Key,
  Rule,
  get_dotted,
  make_config,
  one_of,
  rules_of,
)
from multimodal_jax.errors import UserError


def resolve_dtype(setting: str, platform: str) -> str:
  """`dtype=auto`: bfloat16 compute on GPU and TPU (params and optimizer state stay float32), float32 on
  the CPU, where most x86 parts run bfloat16 matmuls slower than float32 ones (docs/trainer.md)."""
  if setting != "auto":
    return setting
  return "float32" if platform == "cpu" else "bfloat16"


# The loop's and the optimizer's keys, shared by every experiment, declared in `base_keys()`.
# `SECTION_KEYS` may also live in a sub-config of their own (one per training stage, e.g.
# `autoencoder.steps`); seed, mesh and dtype stay at the top.
TOP_KEYS = ("seed", "mesh", "dtype", "profile_steps", "compile_cache", "report_to", "target")


SECTION_KEYS = (
  "steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay", "grad_clip", "grad_accum_steps",
  "ema_decay", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "weight_decay_mask", "freeze",
  "init_from",
)  # fmt: skip


def base_keys(section: bool = False, **defaults: Any) -> dict[str, Key]:
  """The shared keys (group "loop") with their defaults (`defaults` overrides them): the whole set,
  or with `section=True` only SECTION_KEYS (a stage's sub-config)."""
  keys = {
    "seed": Key(
      0, Rule(lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"), "seed of init, data order, dropout", "loop"
    ),
    "mesh": Key("data:-1", MESH, "device mesh, e.g. data:4,fsdp:2 (multimodal_jax.sharding)", "loop"),
    "dtype": Key(
      "auto",
      DTYPE,
      "compute dtype of the matmuls and activations (params and optimizer state stay float32); auto: bfloat16 on "
      "GPU and TPU, float32 on the CPU (the resolved value is recorded with the run)",
      "loop",
    ),
    "report_to": Key(
      "tensorboard",
      Rule(mt.report_to_ok, "a comma list of tensorboard, wandb (or none)"),
      'where metrics go besides WORKDIR/metrics.jsonl: tensorboard, wandb (pip install -e ".[wandb]"; '
      "WANDB_MODE=offline without network), or none",
      "loop",
    ),
    "target": Key(
      "",
      Rule(lambda v: isinstance(v, str), "tpu:TYPE:TOPOLOGY or gpu:MODEL:N[xHOSTS]"),
      "--mode=plan: the accelerator to compile for without it, e.g. tpu:v5p:2x2x2, tpu:v5e:2x4, gpu:h100:8, "
      "gpu:h200:8x8 (batch_size=max searches the largest batch that fits)",
      "plan",
    ),
    "profile_steps": Key(
      "",
      Rule(_profile_steps_ok, "START:END with 0 <= START < END (e.g. 5:8), or empty"),
      "START:END: a jax.profiler trace of those steps in WORKDIR/profile",
      "loop",
    ),
    "compile_cache": Key(
      "",
      Rule(lambda v: isinstance(v, str), "a directory, off, or empty for the user cache dir"),
      'persistent compilation cache: DIR, "" (~/.cache/multimodal_jax/jax_cache) or off',
      "loop",
    ),
    "steps": Key(1000, POSITIVE, "total training steps: a resumed run trains up to this step", "loop"),
    "batch_size": Key(
      64,
      Rule(
        lambda v: v == MAX_BATCH or (POSITIVE.test(v) and isinstance(v, int)), "a number > 0 (max: with --mode=plan)"
      ),
      "global batch size, over all processes and devices (max with --mode=plan: the largest that fits)",
      "loop",
    ),
    "learning_rate": Key(1e-3, NON_NEGATIVE, "peak of linear warmup + cosine decay (train.make_optimizer)", "loop"),
    "warmup_steps": Key(100, NON_NEGATIVE, "steps of linear learning-rate warmup", "loop"),
    "weight_decay": Key(0.0, NON_NEGATIVE, "AdamW weight decay", "loop"),
    "grad_clip": Key(1.0, NON_NEGATIVE, "global-norm gradient clipping; 0 disables", "loop"),
    "grad_accum_steps": Key(1, POSITIVE, "microbatches per step (batch_size is split into them)", "loop"),
    "ema_decay": Key(
      0.0, Rule(lambda v: 0 <= v < 1, "a number in [0, 1) (0 disables the EMA)"), "decay of the params' EMA", "loop"
    ),
    "log_every": Key(50, POSITIVE, "steps between logged metrics", "loop"),
    "eval_every": Key(0, NON_NEGATIVE, "steps between evaluations; 0: only at the end", "loop"),
    "checkpoint_every": Key(250, POSITIVE, "steps between checkpoints", "loop"),
    "keep_checkpoints": Key(
      3, Rule(lambda v: isinstance(v, int) and v >= 1, "at least 1 (checkpoints to keep)"), "checkpoints kept", "loop"
    ),
    "weight_decay_mask": Key(
      "default", one_of("default", "all"), "default: decay kernels and token tables only; all: every parameter", "loop"
    ),
    "freeze": Key(
      "",
      Rule(_regex_ok, "a regular expression over parameter paths (or an alias such as image, text)"),
      "REGEX over '/'-joined param paths (or the method's alias, e.g. image): no updates, no optimizer moments",
      "loop",
    ),
    "init_from": Key(
      "",
      Rule(_source_ok, "workdir:DIR[@STEP] or a converter's SOURCE such as open_clip:FILE"),
      "initial params of a fresh run (a resumed run ignores it): workdir:DIR[@STEP] or a converter's SOURCE",
      "loop",
    ),
  }
  if section:
    keys = {name: key for name, key in keys.items() if name in SECTION_KEYS}
  unknown = set(defaults) - set(keys)
  if unknown:
    raise ValueError(f"base_keys has no keys {sorted(unknown)}")
  for name, value in defaults.items():
    if isinstance(keys[name].default, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)  # a float key stays a float (as a ConfigDict would keep it)
    keys[name] = dataclasses.replace(keys[name], default=value)
  return keys


def base_config(section: bool = False, **defaults: Any) -> ml_collections.ConfigDict:
  """The shared keys' `ConfigDict` (see `base_keys`)."""
  return make_config(base_keys(section, **defaults))


def base_rules(prefix: str = "", section: bool = False) -> dict[str, Rule]:
  """The rule of each shared key, named `prefix + key`."""
  return {prefix + name: rule for name, rule in rules_of(base_keys(section)).items()}


def _profile_steps_ok(text: str) -> bool:
  try:
    profiling.parse_profile_steps(text)
  except (ValueError, AttributeError):
    return False
  return True


def _regex_ok(text: str) -> bool:
  try:
    re.compile(text)
  except re.error:
    return False
  return True


def _source_ok(text: str) -> bool:
  if not text:
    return True
  kind, sep, rest = text.partition(":")
  return bool(sep and kind and rest)


def batch_relation(prefix: str = "") -> Callable[[Any], None]:
  """The cross-key rule: the batch splits into `grad_accum_steps` equal microbatches."""

  def relation(config):
    batch, accum = get_dotted(config, prefix + "batch_size"), get_dotted(config, prefix + "grad_accum_steps")
    if batch != MAX_BATCH and batch % accum:
      raise UserError(
        f"{prefix}batch_size={batch} is not divisible by {prefix}grad_accum_steps={accum}: choose a batch size that "
        "is a multiple of it"
      )

  return relation


def check_batch(config: Any, mesh: jax.sharding.Mesh, prefix: str = "") -> None:
  """Every microbatch (`batch_size / grad_accum_steps`) splits evenly over the mesh's data-parallel
  devices; a one-line UserError otherwise. Applied the same way by every experiment."""
  batch, accum = get_dotted(config, prefix + "batch_size"), get_dotted(config, prefix + "grad_accum_steps")
  if batch == MAX_BATCH:
    raise UserError(
      f"{prefix}batch_size=max is for --mode=plan (it searches the largest batch that fits): give a number"
    )
  size = shd.data_parallel_size(mesh)
  if (batch // accum) % size:
    what = f"{prefix}batch_size={batch}" + (f" / {prefix}grad_accum_steps={accum}" if accum > 1 else "")
    raise UserError(f"{what} must be divisible by the {size} data-parallel devices of the mesh")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The keys `fit` reads, from an experiment's config (top-level or one stage's sub-config)."""

  steps: int
  batch_size: int  # global
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate only at the end
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  grad_accum_steps: int = 1
  dtype: str = "float32"
  ema_decay: float = 0.0  # 0 disables the EMA
  init_from: str = ""  # initial params of a fresh run (a resumed run ignores it)
  profile_steps: str = ""  # START:END: profile those steps into WORKDIR/profile

  @classmethod
  def from_config(cls, config: Any, section: str | None = None) -> LoopConfig:
    """Reads the fields from `config` (and its `section` sub-config for the per-stage keys); a
    field that is missing is an error, not a silent default."""
    values = {}
    for field in dataclasses.fields(cls):
      node = config if section is None or field.name in TOP_KEYS else config[section]
      if field.name not in node:
        where = f"{section}.{field.name}" if section and field.name not in TOP_KEYS else field.name
        raise ValueError(f"the config has no key {where!r}: build it from loop.base_config()")
      values[field.name] = node[field.name]
    return cls(**values)
