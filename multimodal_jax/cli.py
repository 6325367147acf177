"""The command line shared by experiments: `--workdir DIR --mode=MODE --config.KEY=VALUE ...`.

Errors the user can fix end the process with one line on stderr and exit status 2; nothing that
was saved is touched. The order of checks: the command line and every config value against its
declared rule, then the workdir (a writable directory), then, for the modes that read a trained
run, that no override changes a key the checkpoint fixes; only then does JAX start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from multimodal_jax import checkpoint, distributed
from multimodal_jax.checkpoint import CheckpointMismatchError, CheckpointWriteError, NoUsableCheckpointError
from multimodal_jax.config import Rules, apply_overrides, get_dotted, overridden_keys, validate
from multimodal_jax.errors import UserError
from multimodal_jax.loop import NonFiniteLossError
from multimodal_jax.profiling import setup_compile_cache
from multimodal_jax.sharding import MeshSpecError

# Failures with a message that says what to do: printed as one line, no traceback.
ONE_LINE_ERRORS = (
  UserError,
  MeshSpecError,
  NonFiniteLossError,
  NoUsableCheckpointError,
  CheckpointMismatchError,
  CheckpointWriteError,
  checkpoint.NoCheckpointError,
)


def run(
  get_config: Callable[[], ml_collections.ConfigDict],
  modes: Mapping[str, Callable[[ml_collections.ConfigDict, str], object]],
  argv: Sequence[str] | None = None,
  prog: str | None = None,
  *,
  rules: Rules,
  relations: Sequence[Callable] = (),
  eval_keys: Sequence[str] = (),
  saved_run: Callable[[str], str] = lambda workdir: workdir,
) -> int:
  """Parses the command line and runs `modes[mode](config, workdir)`; returns the exit status.

  The first mode trains; the others read a trained run (`saved_run(workdir)` is the directory whose
  checkpoint holds its config): in those, only the `eval_keys` may be changed on the command line.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
    prog=prog, description=(get_config.__doc__ or "").strip().splitlines()[0] if get_config.__doc__ else None
  )
  parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, eval.json")
  parser.add_argument("--mode", default=next(iter(modes)), choices=list(modes))
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      print(f"error: unrecognised argument {item!r}; use --config.KEY=VALUE to change the config", file=sys.stderr)
      return 2
    overrides.append(item[len("--config.") :])
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  training = args.mode == next(iter(modes))
  try:
    config = apply_overrides(get_config(), overrides)
    validate(config, rules, relations)
    check_workdir(args.workdir, create=training)
    if not training:
      check_fixed_keys(saved_run(args.workdir), overridden_keys(overrides), config, eval_keys, args.mode)
    distributed.maybe_initialize()
    setup_compile_cache(config.get("compile_cache", ""))  # before anything compiles
    modes[args.mode](config, args.workdir)
  except ONE_LINE_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
    return 130
  return 0


def check_workdir(workdir: str, create: bool) -> None:
  """UserError unless `workdir` is a directory we can write in or (with `create`, for training) one
  that can be made there; nothing is created here, so a run refused later leaves no empty folder."""
  if "://" in workdir:
    return  # remote storage: its client reports its own errors when the run writes
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory: choose another --workdir")
  probe = workdir
  if not os.path.isdir(workdir):
    if not create:
      raise UserError(f"no checkpoint in {workdir}: the directory does not exist (train first with this --workdir)")
    probe = os.path.dirname(os.path.abspath(workdir))
    while not os.path.isdir(probe):  # the nearest folder that exists: the run creates the rest
      if os.path.exists(probe):
        raise UserError(f"cannot create --workdir {workdir}: {probe} is a file; choose another --workdir")
      probe = os.path.dirname(probe)
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise UserError(
      f"cannot write in --workdir {workdir} ({probe}: {e.strerror}); make it writable or choose another --workdir"
    ) from None


def check_fixed_keys(saved_dir: str, keys: Sequence[str], config, eval_keys: Sequence[str], mode: str) -> None:
  """UserError when an override in a mode that reads a trained run changes a key that the run's
  checkpoint fixes (its model, its data, ...): the run would silently be evaluated as saved."""
  try:
    saved = checkpoint.read_config(saved_dir)
  except checkpoint.NoCheckpointError:
    return  # the mode itself reports the missing checkpoint
  for key in keys:
    if key.split(".")[0] in eval_keys or key in eval_keys:
      continue
    try:
      value = get_dotted(saved, key)
    except (KeyError, TypeError):
      continue  # a key the run did not have: the mode reports the mismatch of experiments
    if value != get_dotted(config, key):
      allowed = ", ".join(eval_keys) or "none"
      raise UserError(
        f"--config.{key}={get_dotted(config, key)} in --mode={mode}: the run in {saved_dir} was trained with "
        f"{key}={value!r}, which the checkpoint fixes; drop the override (keys this mode may change: {allowed})"
      )
