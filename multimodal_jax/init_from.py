"""The initial params of a fresh run from `--config.init_from=SOURCE`: another run of ours
(`workdir:DIR[@STEP]`) or a converter's source (`KIND:PATH`, e.g. `open_clip:FILE`), created
directly in the params' shardings and checked tensor by tensor against the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from multimodal_jax import checkpoint as ckpt
from multimodal_jax.errors import UserError


def initial_params(
  source: str, abstract_params: Any, converters: Mapping[str, Callable[[str, Any], Any]]
) -> Any | None:
  """The params named by `source`, created in `abstract_params`' shardings (FSDP/tensor as the
  rules table says, never replicated first); None when the source holds none of the params.

  `workdir:DIR[@STEP]` restores another run of ours (its EMA params when it kept them; params only,
  no optimizer state). `KIND:PATH` calls `converters[KIND](PATH, abstract_params)`, which returns
  the converted params as a tree of arrays; a tensor the model lacks or holds with another shape
  is a one-line UserError naming it. A converter returns None for a source that initialises no
  params but a locked component outside them (CLIP's `minilm:DIR`, a featuriser's weights): the run
  then starts from the model's own initialisation.
  """
  kind, _, rest = source.partition(":")
  if kind == "workdir":
    directory, _, step = rest.partition("@")
    if step and not step.isdigit():
      raise UserError(f"init_from={source}: the step after @ must be a number")
    try:
      _, params, _ = ckpt.restore_params(directory, abstract_params, step=int(step) if step else None)
    except (ckpt.NoCheckpointError, ckpt.CheckpointMismatchError) as e:
      raise UserError(f"init_from={source}: {e}") from None
    return params
  if kind not in converters:
    known = ", ".join(["workdir", *converters])
    raise UserError(f"init_from={source}: unknown source kind {kind!r}; this experiment reads {known}")
  converted = converters[kind](rest, abstract_params)
  if converted is None:
    return None
  check_same_tree(converted, abstract_params, f"init_from={source}")
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), converted, abstract_params)


def outside_params(path: str, abstract_params: Any) -> None:
  """The converter of a source whose weights are not among the params (a locked featuriser reads
  them from its PATH): it converts nothing, so the model keeps its own initialisation."""


def check_same_tree(params: Any, abstract_params: Any, what: str) -> None:
  """UserError naming the first tensor that `params` lacks, has in excess or holds with another
  shape than `abstract_params`."""
  got = {ckpt.dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {ckpt.dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  for name, shape in want.items():
    if name not in got:
      raise UserError(f"{what} does not fit the model: it has no tensor {name} (shape {shape}); check --config.model")
    if got[name] != shape:
      raise UserError(
        f"{what} does not fit the model: {name} has shape {got[name]} there but {shape} here; check --config.model"
      )
  extra = sorted(set(got) - set(want))
  if extra:
    raise UserError(f"{what} does not fit the model: it has {extra[0]} {got[extra[0]]}, which the model lacks")
