"""The command line shared by experiments: `--workdir DIR --mode=MODE [--config=FILE.py[:ARG]]
--config.KEY=VALUE ...`; `--help` lists the modes and every config key with its default and rule.

Errors the user can fix end the process with one line on stderr and exit status 2; nothing that
was saved is touched. The order of checks: the command line, the config file's keys and values, and
every config value against its declared rule, then the workdir (a writable directory), then, for the
modes that read a trained run, that no override changes a key the checkpoint fixes; only then does
JAX start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from multimodal_jax import checkpoint, distributed, quiet_orbax
from multimodal_jax.checkpoint import CheckpointMismatchError, CheckpointWriteError, NoUsableCheckpointError
from multimodal_jax.config import (
  ANY,
  GROUPS,
  Key,
  Keys,
  Rules,
  apply_overrides,
  flat_keys,
  get_dotted,
  help_text,
  overridden_keys,
  validate,
)
from multimodal_jax.config_files import apply_config_file, load_config_file
from multimodal_jax.errors import UserError
from multimodal_jax.loop import NonFiniteLossError
from multimodal_jax.profiling import setup_compile_cache
from multimodal_jax.sharding import MeshSpecError

PLAN_MODE = "plan"

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
  keys: Keys | None = None,
  groups: Mapping[str, str] | None = None,
) -> int:
  """Parses the command line and runs `modes[mode](config, workdir)`; returns the exit status.

  The first mode trains; `plan` (PLAN_MODE) compiles the steps for an accelerator target (it reads no
  run and sets up JAX for compile-only devices first); the others read a trained run (`saved_run(workdir)` is the directory whose
  checkpoint holds its config): in those, only the `eval_keys` may be changed on the command line.
  `keys` (default: the ones `get_config` declares, `config.declares`) and their `groups` are what
  `--help` lists. This is the process's entry point, so it also keeps orbax's background tracebacks
  off the terminal (`quiet_orbax`), which a library import leaves alone.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  keys = keys if keys is not None else getattr(get_config, "keys", None)
  groups = groups if groups is not None else getattr(get_config, "groups", GROUPS)
  parser = _parser(get_config, modes, prog)
  try:
    rest, config_file, overrides = split_config_args(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args, rest = parser.parse_known_args(rest)
  if args.help:
    print(
      parser.format_help() + CONFIG_HELP + _modes_help(modes) + "\n" + _keys_help(get_config, rules, keys, groups),
      end="",
    )
    return 0
  if args.workdir is None:
    parser.error("the following arguments are required: --workdir")
  if rest:
    print(f"error: unrecognised argument {rest[0]!r}; use --config.KEY=VALUE to change the config", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  quiet_orbax.install()
  training = args.mode == next(iter(modes))
  planning = args.mode == PLAN_MODE  # compiles for a target: reads no run, writes WORKDIR/plan
  if planning:
    from multimodal_jax.targets import prepare_environment

    prepare_environment()  # before JAX starts its backends: CPU only, the CUDA plugin allowed without a GPU
  try:
    config, file_keys = get_config(), []
    if config_file is not None:
      values = load_config_file(config_file)
      config, file_keys = apply_config_file(config, values, f"--config={config_file}", rules)
    config = apply_overrides(config, overrides)
    validate(config, rules, relations)
    check_workdir(args.workdir, create=training or planning)
    if not training and not planning:
      fixed = list(dict.fromkeys(file_keys + overridden_keys(overrides)))
      check_fixed_keys(saved_run(args.workdir), fixed, config, eval_keys, args.mode)
    if not planning:
      distributed.cpu_without_accelerators()  # the [plan] extra's plugins stay quiet on a CPU host
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


def split_config_args(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
  """`(other arguments, FILE.py[:ARG] of --config or None, ["KEY=VALUE", ...])` of a command line.

  `--config.KEY=VALUE` and `--config.KEY VALUE` are the same override, as are `--config=FILE` and
  `--config FILE`. A `--config.KEY` followed by another option (or nothing) is kept without a value,
  for `apply_overrides` to report.
  """
  rest, config_file, overrides = [], None, []
  items = iter(argv)
  for item in items:
    if item.startswith("--config."):
      key, sep, value = item[len("--config.") :].partition("=")
      if not sep:
        value = next(items, None)
        if value is None or value.startswith("--"):
          overrides.append(key)
          if value is not None:
            rest.append(value)  # the next option, parsed as it would be anyway
          continue
      overrides.append(f"{key}={value}")
    elif item == "--config" or item.startswith("--config="):
      value = item[len("--config=") :] if item.startswith("--config=") else next(items, None)
      if not value or value.startswith("--"):
        raise UserError("--config needs a file: --config=FILE.py[:ARG] (an ml_collections config file)")
      if config_file is not None:
        raise UserError(f"--config is given twice ({config_file}, {value}): name one config file")
      config_file = value
    else:
      rest.append(item)
  return rest, config_file, overrides


CONFIG_HELP = """  --config=FILE.py[:ARG]
                        an ml_collections config file: its get_config() (or get_config(ARG)) sets some or all keys
  --config.KEY=VALUE, --config.KEY VALUE
                        change one config key (after the config file); the keys are listed below

"""


def _parser(get_config: Callable, modes: Mapping, prog: str | None) -> argparse.ArgumentParser:
  doc = (get_config.__doc__ or "").strip()
  first = next(iter(modes))
  usage = (
    f"{prog or '%(prog)s'} [-h] --workdir DIR [--mode {{{','.join(modes)}}}] [--config=FILE.py[:ARG]] "
    "[--config.KEY=VALUE ...]"
  )
  parser = argparse.ArgumentParser(
    prog=prog,
    usage=usage,
    description=doc.splitlines()[0] if doc else None,
    add_help=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("-h", "--help", action="store_true", help="show this help (every config key) and exit")
  parser.add_argument("--workdir", metavar="DIR", help="run directory: checkpoints, metrics, eval.json")
  parser.add_argument("--mode", default=first, choices=list(modes), help=f"what to do (default: {first}; see modes)")
  return parser


def _modes_help(modes: Mapping[str, Callable], width: int = 100) -> str:
  """The modes, each with the first paragraph of its docstring (the first mode trains)."""
  lines = ["modes:"]
  for i, (name, fn) in enumerate(modes.items()):
    doc = (getattr(fn, "__doc__", None) or "").strip().split("\n\n")[0]
    about = " ".join(doc.split()) or (
      "train (resumes from the checkpoint in --workdir)" if i == 0 else "reads the trained run in --workdir"
    )
    lines.append(textwrap.fill(f"{name:<12} {about}", width, initial_indent="  ", subsequent_indent=" " * 15))
  return "\n".join(lines) + "\n"


def _keys_help(get_config: Callable, rules: Rules, keys: Keys | None, groups: Mapping[str, str]) -> str:
  """Every config key by group; a `get_config` that declares no keys gets its defaults and rules listed."""
  if keys is None:
    defaults = flat_keys(get_config())
    keys = {name: Key(value, rules.get(name, ANY), "", "config") for name, value in defaults.items()}
  return "config keys (--config.KEY=VALUE; the default shown):\n\n" + help_text(keys, groups)


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
