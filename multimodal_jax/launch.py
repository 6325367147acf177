"""Process start-up for experiment launches (imports nothing heavy: runs before JAX loads)."""

from __future__ import annotations

import os
import sys

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def with_tcmalloc(environ: dict[str, str]) -> dict[str, str] | None:
  """`environ` with tcmalloc added to LD_PRELOAD, for a process about to start; None where it is not
  installed, already preloaded, or MMJ_NO_TCMALLOC is set."""
  if environ.get("MMJ_NO_TCMALLOC") or "tcmalloc" in environ.get("LD_PRELOAD", "") or not os.path.exists(TCMALLOC):
    return None
  return dict(environ, LD_PRELOAD=":".join(filter(None, [TCMALLOC, environ.get("LD_PRELOAD")])))


def maybe_reexec_with_tcmalloc() -> None:
  """Restarts `python -m ...` with tcmalloc preloaded when it is installed and not yet in use.

  XLA's CPU runtime frees and re-touches its large buffers every step; with glibc malloc that
  costs page faults and a large part of the step time (the README's CLIP benchmark table compares
  the two allocators), which is why TPU VM images preload tcmalloc too. Set MMJ_NO_TCMALLOC=1 to
  keep the default allocator.
  """
  env = with_tcmalloc(dict(os.environ))
  if env is None or "jax" in sys.modules:
    return
  sys.stdout.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
