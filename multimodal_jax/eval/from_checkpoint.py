"""Reading a run from its workdir alone: its saved config, its params (no optimizer), its eval.json."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from multimodal_jax import checkpoint, train
from multimodal_jax.errors import UserError
from multimodal_jax.files import write_json


def saved_config(
  workdir: str, config: ml_collections.ConfigDict, keep: Sequence[str], recorded: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was trained with, except the `keep` keys (e.g. mesh, data_dir),
  which come from `config`. `recorded` keys are ones training adds to the saved config.

  UserError when the workdir holds no checkpoint, or a run whose keys differ from this
  experiment's (another experiment's workdir).
  """
  try:
    saved = checkpoint.read_config(workdir)
  except checkpoint.NoCheckpointError as e:
    raise UserError(str(e)) from None
  lacking = [k for k in config if k not in saved]
  unknown = [k for k in saved if k not in config and k not in recorded]
  if lacking or unknown:
    parts = [
      f"it lacks {', '.join(lacking[:5])}" if lacking else "",
      f"it has {', '.join(unknown[:5])}" if unknown else "",
    ]
    raise UserError(
      f"the run in {workdir} was not trained by this experiment ({'; '.join(p for p in parts if p)}): "
      "evaluate it with the experiment that trained it"
    )
  merged = {**saved, **{k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k] for k in keep}}
  return ml_collections.ConfigDict(merged)


def restore_params(
  workdir: str,
  init_params: Callable[[jax.Array], Any],
  mesh: jax.sharding.Mesh,
  ema: bool | None = None,
  model_state: Any = None,
) -> tuple[int, Any] | tuple[int, Any, Any]:
  """`(step, params)` of the newest readable checkpoint in `workdir`, sharded for `mesh` (the EMA
  params when the run kept an EMA, unless `ema` says otherwise). Builds no optimizer.

  With `model_state` (the model state's `jax.ShapeDtypeStruct`s, e.g. batch-norm statistics), also
  the model state saved with those params: `(step, params, model_state)`, replicated on `mesh`.
  """
  state_target = None
  if model_state is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), model_state)
  try:
    step, params, restored_state = checkpoint.restore_params(
      workdir, train.abstract_params(init_params, mesh), ema=ema, model_state=state_target
    )
  except checkpoint.NoCheckpointError as e:
    raise UserError(str(e)) from None
  except checkpoint.CheckpointMismatchError as e:
    if model_state is None or "model_state" not in str(e):
      raise
    raise UserError(
      f"the run in {workdir} was saved without its model state (batch-norm statistics), by an older version of "
      "this library: train it again"
    ) from None
  return (step, params) if model_state is None else (step, params, restored_state)


def report(workdir: str, result: dict) -> None:
  """Writes WORKDIR/eval.json (atomically) and prints the result as the last line of stdout (process 0)."""
  if jax.process_index() == 0:
    write_json(f"{workdir}/eval.json", result)
    print(json.dumps(result), flush=True)
