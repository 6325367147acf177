"""The command line shared by experiments: `--workdir DIR --mode=MODE --config.KEY=VALUE ...`.

Errors the user can fix end the process with one line on stderr and exit status 2; nothing that
was saved is touched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from multimodal_jax import distributed
from multimodal_jax.checkpoint import CheckpointMismatchError, NoUsableCheckpointError
from multimodal_jax.config import apply_overrides
from multimodal_jax.errors import UserError
from multimodal_jax.loop import NonFiniteLossError
from multimodal_jax.sharding import MeshSpecError

# Failures with a message that says what to do: printed as one line, no traceback.
ONE_LINE_ERRORS = (UserError, MeshSpecError, NonFiniteLossError, NoUsableCheckpointError, CheckpointMismatchError)


def run(
  get_config: Callable[[], ml_collections.ConfigDict],
  modes: Mapping[str, Callable[[ml_collections.ConfigDict, str], object]],
  argv: Sequence[str] | None = None,
  prog: str | None = None,
) -> int:
  """Parses the command line and runs `modes[mode](config, workdir)`; returns the exit status."""
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
  try:
    config = apply_overrides(get_config(), overrides)
    distributed.maybe_initialize()
    modes[args.mode](config, args.workdir)
  except ONE_LINE_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
    return 130
  return 0
