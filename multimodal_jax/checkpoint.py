"""Checkpoints of a run: train state, data-iterator state and config, via an orbax CheckpointManager.

Layout: WORKDIR/checkpoints/<step>/{state,data,config}. Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames it when complete), so an interrupted save never
replaces the last good checkpoint. A checkpoint that cannot be read is reported and the
previous one is used. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The checkpoint holds a different model or optimizer than the one being restored."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore (they were moved aside)."""


class Checkpointer:
  """Saves and restores `(state, data iterator, config)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
      ),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_iterator: Any = None, config: dict | None = None) -> None:
    """Starts an asynchronous save of everything needed to resume at `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, Any, bool]:
    """Restores the newest readable checkpoint: `(step, state, data_state_restored)`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings; arrays come back with
    those shardings, so a checkpoint written on one mesh (or process count) restores onto another.
    The data iterator is restored in place when the checkpoint holds a state for this process
    layout; otherwise `data_state_restored` is False and the caller repositions it.
    """
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        self._check_matches(step, abstract_state)
      except CheckpointMismatchError:
        raise  # a readable checkpoint of another model: never moved aside
      except Exception:  # noqa: BLE001, S110 - unreadable metadata: the restore below reports it
        pass
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        log.warning(
          "checkpoint at step %d in %s is unreadable (%s); trying the previous one", step, self.directory, reason
        )
        if jax.process_index() == 0:
          print(
            f"warning: checkpoint at step {step} is unreadable ({reason}); falling back to an earlier one", flush=True
          )
        errors.append(step)
        self._set_aside(step)
        continue
      data_restored = False
      if data_iterator is not None:
        try:
          self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
          data_restored = True
        except Exception as e:  # noqa: BLE001 - e.g. written by a different number of processes
          log.info("data iterator state not restored from step %d: %s", step, e)
      return step, restored["state"], data_restored
    raise NoUsableCheckpointError(
      f"no readable checkpoint in {self.directory}: steps {errors} were unreadable and moved to "
      "checkpoints_unreadable/; rerun to start from scratch, or restore them by hand"
    )

  def _check_matches(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError naming the first array whose name or shape differs."""
    saved = {
      leaf.name: tuple(leaf.shape)
      for leaf in jax.tree.leaves(self._manager.item_metadata(step)["state"].tree)
      if hasattr(leaf, "shape")
    }
    expected = {_dotted(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    for name, shape in expected.items():
      if name not in saved:
        problem = f"it has no array {name} (shape {shape})"
      elif saved[name] != shape:
        problem = f"{name} has shape {saved[name]} there but {shape} here"
      else:
        continue
      raise CheckpointMismatchError(
        f"the checkpoint at step {step} in {self.directory} holds a different model: {problem}; "
        "rerun with the config it was trained with, or use a new --workdir"
      )
    extra = sorted(set(saved) - set(expected))
    if extra:
      raise CheckpointMismatchError(
        f"the checkpoint at step {step} in {self.directory} holds a different model: it has {extra[0]} "
        f"{saved[extra[0]]}, which this model lacks; rerun with the config it was trained with, or use a new --workdir"
      )

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable checkpoint to WORKDIR/checkpoints_unreadable/ (kept for inspection),
    so that training can write that step again."""
    if jax.process_index() == 0:
      target = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
      os.makedirs(target, exist_ok=True)
      destination = os.path.join(target, str(step))
      suffix = 1
      while os.path.exists(destination):
        destination, suffix = os.path.join(target, f"{step}.{suffix}"), suffix + 1
      os.replace(os.path.join(self.directory, str(step)), destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _dotted(path) -> str:
  """A jax key path as orbax names the array: "opt_state.0.mu.dense.kernel"."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)
