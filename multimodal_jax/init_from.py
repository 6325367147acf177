"""The initial params of a fresh run from `--config.init_from=SOURCE`: another run of ours
(`workdir:DIR[@STEP]`), a converter's source (`KIND:PATH`, e.g. `open_clip:FILE`) or a Hub model
in the local Hugging Face cache (`hf-hub:ORG/NAME[@REVISION]`, e.g. an open_clip checkpoint), created
directly in the params' shardings and checked tensor by tensor against the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from multimodal_jax import checkpoint as ckpt
from multimodal_jax.convert import hf_hub
from multimodal_jax.errors import UserError


def initial_params(
  source: str, abstract_params: Any, converters: Mapping[str, Callable[[str, Any], Any]]
) -> Any | None:
  """The params named by `source`, created in `abstract_params`' shardings (FSDP/tensor as the
  rules table says, never replicated first); None when the source holds none of the params.

  `workdir:DIR[@STEP]` restores another run of ours (its EMA params when it kept them; params only,
  no optimizer state). `KIND:PATH` calls `converters[KIND](PATH, abstract_params)`, which returns
  the converted params as a tree of arrays; a tensor the model lacks or holds with another shape
  is a one-line UserError naming it. `hf-hub:ORG/NAME[@REVISION]` is a Hub model in the local
  Hugging Face cache (`convert.hf_hub`): the converter is the one of what its snapshot holds (an
  open_clip checkpoint, a sentence-transformers folder, ...), among this experiment's, given the
  Hub name as its PATH (its readers resolve it). A converter returns None for a source that initialises no
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
  if kind + ":" == hf_hub.PREFIX:
    kind, rest = _hub_kind(source, converters)
  if kind not in converters:
    known = ", ".join(["workdir", *converters, "hf-hub"])
    raise UserError(f"init_from={source}: unknown source kind {kind!r}; this experiment reads {known}")
  converted = converters[kind](rest, abstract_params)
  if converted is None:
    return None
  check_same_tree(converted, abstract_params, f"init_from={source}")
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), converted, abstract_params)


def _hub_kind(source: str, converters: Mapping[str, Callable[[str, Any], Any]]) -> tuple[str, str]:
  """(converter kind, PATH) of `hf-hub:ORG/NAME[@REVISION]`: the first of the experiment's converters
  whose kind the cached snapshot holds, with the Hub name itself as PATH.

  A kind read outside the params (`outside_params`: the locked MiniLM of `minilm:DIR`) is read
  from the source by the experiment's own code (`config.source_path`), before this runs: where that
  code does not take Hub names, the run would silently use another model, so it is refused with
  the `KIND:hf-hub:...` form that it does take."""
  from multimodal_jax.config import source_path

  kinds = [k for k in converters if k in hf_hub.KINDS]
  if not kinds:
    raise UserError(
      f"init_from={source}: this experiment reads no Hub models (it reads {', '.join(['workdir', *converters])})"
    )
  kind, _ = hf_hub.resolve(source, kinds, "init_from")
  if converters[kind] is outside_params and source_path(source, kind) is None:
    raise UserError(
      f"init_from={source} holds {hf_hub.WHAT[kind]}, which this experiment reads outside the params as "
      f"{kind}:DIR: give --config.init_from={kind}:{source}"
    )
  return kind, source


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
