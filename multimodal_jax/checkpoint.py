"""Checkpoints of a run: train state, data-iterator state and config, via an orbax CheckpointManager.

Layout: WORKDIR/checkpoints/<step>/{state,data,config}. Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames it when complete), so an interrupted save never
replaces the last good checkpoint. A checkpoint that cannot be read is reported and the
previous one is used. Nothing here imports the rest of the package but the leaf `trees`, and an import
changes no process-wide hook: the command line installs `quiet_orbax`'s filters (`cli.run`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from multimodal_jax import trees

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The checkpoint holds a different model or optimizer than the one being restored."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore (they were moved aside)."""


class NoCheckpointError(FileNotFoundError):
  """A run that only reads (eval, sample, enhance, a locked featuriser) found no checkpoint."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only storage); earlier ones are intact."""


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """`workdir` as an `etils.epath` path: local folders become absolute, `gs://...` (or any other
  URI epath knows) stays remote, so every file of a run goes through the same path type."""
  path = epath.Path(workdir)
  return path if "://" in os.fspath(workdir) else path.absolute()


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / "checkpoints"


def saved_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir`, oldest first, read from the directory
  listing alone (no orbax, no JAX backend): a step directory that is still being written carries
  orbax's temporary suffix and is not counted."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(int(child.name) for child in directory.iterdir() if child.name.isdigit())


def read_config(workdir: str, step: int | None = None) -> dict:
  """The config saved with the checkpoint at `step` (default: the newest) of the run in `workdir`.

  Plain file reads, so it works before JAX starts. NoCheckpointError when there is none.
  """
  steps = saved_steps(workdir)
  if not steps:
    raise NoCheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with the same --workdir")
  step = steps[-1] if step is None else step
  path = checkpoint_dir(workdir) / str(step) / "config" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise NoCheckpointError(
      f"the checkpoint at step {step} in {checkpoint_dir(workdir)} has no readable config ({type(e).__name__}): "
      "it was not written by this library, or it is damaged"
    ) from None


def restore_params(
  workdir: str, abstract_params: Any, ema: bool | None = None, model_state: Any = None, step: int | None = None
):
  """`(step, params, model_state)` of the newest readable checkpoint in `workdir`, without the
  optimizer state (no optimizer is built and its moments are never read).

  `abstract_params` (and `model_state`, when the model has state such as batch-norm statistics)
  are trees of `jax.ShapeDtypeStruct`s carrying the shardings to restore onto. `ema=None` takes
  the EMA params when the run kept them and the raw params otherwise. The checkpoints are only
  read: an unreadable one is reported and the previous one tried. `step` asks for that checkpoint
  only.
  """
  steps = saved_steps(workdir)
  if not steps:
    raise NoCheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with the same --workdir")
  if step is not None:
    if step not in steps:
      raise NoCheckpointError(f"no checkpoint of step {step} in {checkpoint_dir(workdir)} (it has steps {steps})")
    steps = [step]
  del step
  manager = ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=ocp.CheckpointManagerOptions(
      create=False, read_only=True, save_interval_steps=0, enable_async_checkpointing=False
    ),
    item_handlers={
      "state": ocp.PyTreeCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    },
  )
  try:
    for step in reversed(steps):
      try:
        saved = _saved_shapes(manager, step)
        has_ema = any(name.startswith("ema_params.") for name in saved)
        field = "ema_params" if (has_ema if ema is None else ema) else "params"
        if field == "ema_params" and not has_ema:
          raise CheckpointMismatchError(f"the checkpoint at step {step} in {manager.directory} holds no EMA params")
        target = {field: abstract_params}
        if model_state is not None:
          target["model_state"] = model_state
        _check_names(step, manager.directory, saved, target)
        restored = manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
          ),
        )["state"]
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
        _warn_unreadable(step, manager.directory, e, action="trying an earlier one")
        continue
      return step, restored[field], restored.get("model_state")
  finally:
    manager.close()
  raise NoUsableCheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)} (steps {steps} were tried)")


def _warn_unreadable(step: int, directory, error: Exception, action: str) -> None:
  reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
  log.info("checkpoint at step %d in %s is unreadable (%s)", step, directory, error)
  if jax.process_index() == 0:
    print(f"warning: the checkpoint at step {step} in {directory} is unreadable ({reason}); {action}", flush=True)


def _saved_shapes(manager: Any, step: int) -> dict[str, tuple[int, ...]]:
  """`{dotted name: shape}` of the arrays in the state of checkpoint `step` (metadata only)."""
  tree = manager.item_metadata(step)["state"].tree
  return {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")}


def _check_names(
  step: int, directory, saved: dict, target: Any, fix: str = "rebuild the model with the config it was trained with"
) -> None:
  """CheckpointMismatchError naming the first array of `target` that the checkpoint lacks or holds
  with another shape; `fix` says what to do."""
  for path, x in jax.tree_util.tree_leaves_with_path(target):
    name, shape = dotted(path), tuple(x.shape)
    if name not in saved:
      problem = f"it has no array {name} (shape {shape})"
    elif saved[name] != shape:
      problem = f"{name} has shape {saved[name]} there but {shape} here"
    else:
      continue
    if name.startswith("opt_state."):
      raise CheckpointMismatchError(
        f"the checkpoint at step {step} in {directory} holds another optimizer state ({problem}): the optimizer or "
        "its settings differ (e.g. freeze, weight_decay_mask); rerun with the settings it was trained with, or start "
        f"a new --workdir with --config.init_from=workdir:{epath.Path(directory).parent}@{step} to keep its params"
      )
    raise CheckpointMismatchError(
      f"the checkpoint at step {step} in {directory} holds a different model: {problem}; {fix}"
    )


def _state_handler() -> ocp.StandardCheckpointHandler:
  """The train state's handler: orbax's standard one, except that a single process writes each array
  shard by shard rather than "replica-parallel".

  Replica-parallel saving splits a replicated array into one slice per replica so that several hosts
  share its write. In one process every replica is local, so it only adds work: an eager slice per
  replica of every array (each a dispatch, and a compile the first time a shape is seen), then as many
  small transfers (docs/trainer.md, "Checkpoints": 1.7 s of a tiny model's save on 8 CPU devices).
  Orbax has no public switch on its standard handler, so this one gets a registry whose array handler
  is orbax's own with the option off; several processes keep orbax's default. The files differ only in
  how an array is chunked; a checkpoint written replica-parallel restores here.
  """
  handler = ocp.StandardCheckpointHandler()
  if jax.process_count() > 1:
    return handler
  th = ocp.type_handlers
  arrays = copy.copy(th.get_type_handler(jax.Array))
  arrays._use_replica_parallel = False  # orbax reads this attribute; it has no public setter
  registry = th.create_type_handler_registry(
    *((ty, th.get_type_handler(ty)) for ty in (int, float, bytes, np.number, np.ndarray, str)), (jax.Array, arrays)
  )
  # the arguments StandardCheckpointHandler gives the PyTreeCheckpointHandler it wraps, and the registry
  handler._impl = ocp.PyTreeCheckpointHandler(  # private too: see above
    save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry
  )
  return handler


class Checkpointer:
  """Saves and restores `(state, data iterator, config)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
      ),
      item_handlers={
        "state": _state_handler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )
    self._in_flight: int | None = None  # the step of the newest save started
    self._failed = False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_iterator: Any = None, config: dict | None = None) -> None:
    """Starts an asynchronous save of everything needed to resume at `step`.

    A failed write (this one or the previous asynchronous one, which this call waits for) raises
    CheckpointWriteError naming the step, after removing its partial directory.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    with self._writing(self._in_flight or step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._in_flight = step

  @contextlib.contextmanager
  def _writing(self, step: int):
    """Translates a failure to write the checkpoint of `step` (disk full, read-only or unwritable
    storage) into CheckpointWriteError; other errors pass through."""
    try:
      yield
    except Exception as e:
      text = str(e)
      known = isinstance(e, OSError) or any(marker in text for marker in _WRITE_FAILURES)
      if not known or self._failed:
        raise
      self._failed = True
      self._remove_partial()
      good = [s for s in saved_steps(self.directory.parent) if s != step]
      last = f"step {good[-1]} is the last good checkpoint" if good else "no checkpoint was completed"
      full = getattr(e, "errno", None) == errno.ENOSPC or "RESOURCE_EXHAUSTED" in text or "No space left" in text
      what = "no space left" if full else f"cannot write ({_first_line(e)})"
      raise CheckpointWriteError(
        f"{what} on {self.directory} while saving step {step}; {last}. Free space or fix the storage, then rerun "
        "the same command to resume"
      ) from None

  def _remove_partial(self) -> None:
    """Deletes orbax's temporary directories of unfinished saves (never a finished checkpoint)."""
    if jax.process_index() != 0 or not self.directory.is_dir():
      return
    for child in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in child.name:
        try:
          child.rmtree()
        except OSError:
          pass  # best effort: a directory orbax never finishes is ignored by every reader

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
        if "tree structures do not match" in str(e):  # readable, but another optimizer layout: never moved aside
          raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self.directory} holds a train state of another structure (the "
            "optimizer or its settings differ, e.g. freeze or weight_decay_mask, or it was written by an older "
            "version); rerun with the settings it was trained with, or start a new --workdir with "
            f"--config.init_from=workdir:{self.directory.parent}@{step} to keep its params"
          ) from None
        _warn_unreadable(step, self.directory, e, action="falling back to an earlier one")
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
    saved = _saved_shapes(self._manager, step)
    fix = "rerun with the config it was trained with, or use a new --workdir"
    _check_names(step, self.directory, saved, abstract_state, fix)
    expected = {dotted(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
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
      target = self.directory.parent / "checkpoints_unreadable"
      target.mkdir(parents=True, exist_ok=True)
      destination = target / str(step)
      suffix = 1
      while destination.exists():
        destination, suffix = target / f"{step}.{suffix}", suffix + 1
      (self.directory / str(step)).rename(destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    with self._writing(self._in_flight or 0):
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:
        if not self._failed:  # after a reported write failure, orbax's own cleanup may fail too
          raise


# Texts by which tensorstore / orbax report storage that cannot be written.
_WRITE_FAILURES = (
  "RESOURCE_EXHAUSTED",
  "No space left",
  "Read-only file system",
  "PERMISSION_DENIED",
  "Permission denied",
)


def _first_line(error: Exception) -> str:
  return (str(error).splitlines() or [type(error).__name__])[0][:200]


def dotted(path) -> str:
  """A jax key path as orbax names the array: "opt_state.0.mu.dense.kernel" (`trees.path_name`)."""
  return trees.path_name(path, ".")
