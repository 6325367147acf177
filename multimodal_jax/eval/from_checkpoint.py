"""Evaluating a run from its workdir alone: its saved config, its latest params, its eval.json."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax

from multimodal_jax import train
from multimodal_jax.checkpoint import Checkpointer
from multimodal_jax.errors import UserError


def saved_config(
  workdir: str, config: ml_collections.ConfigDict, keep: Sequence[str]
) -> tuple[Checkpointer, ml_collections.ConfigDict]:
  """The config the run in `workdir` was trained with, except the `keep` keys (e.g. mesh, data_dir),
  which come from `config`. Raises UserError when the workdir holds no checkpoint."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # checked first: opening creates it
    raise UserError(f"no checkpoint in {workdir}: train first with the same --workdir")
  checkpointer = Checkpointer(workdir)
  if checkpointer.latest_step() is None:
    raise UserError(f"no checkpoint in {checkpointer.directory}: train first with the same --workdir")
  merged = {**checkpointer.restore_config(), **{k: config[k] for k in keep}}
  return checkpointer, ml_collections.ConfigDict(merged)


def restore_params(
  checkpointer: Checkpointer,
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  ema: bool,
) -> tuple[int, Any]:
  """`(step, params)` of the newest readable checkpoint, sharded for `mesh`; the EMA params when
  the run kept an EMA."""
  abstract_state, _ = train.abstract_train_state(init_params, tx, mesh, ema=ema)
  step, state, _ = checkpointer.restore(abstract_state)
  checkpointer.close()
  return step, state.ema_params if ema else state.params


def report(workdir: str, result: dict) -> None:
  """Writes WORKDIR/eval.json and prints the result as the last line of stdout (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
