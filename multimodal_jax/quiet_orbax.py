"""Keeping orbax's background noise off the user's terminal.

When a checkpoint read fails (a truncated file) or a write fails (a full disk), the call that
waits for it raises and `checkpoint` reports that in one line. Orbax's and tensorstore's background
machinery reports the same failure again, as tracebacks: absl ERROR logs from its threads,
asyncio's "exception was never retrieved", unraisable "Event loop is closed" errors from callbacks
into loops orbax already closed, thread exceptions, and "coroutine ... was never awaited" warnings
for the array-serialization coroutines of a write that failed (collected at exit). `install()`
filters exactly those (by their origin in orbax / tensorstore frames, or by their names);
everything else passes through. The command line's entry point (`cli.run`) installs them; importing
the library changes no process-wide hook. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
import warnings


class _DropOrbaxTracebacks(logging.Filter):
  """Drops the tracebacks orbax's background threads log when a write fails (the failure reaches
  the caller as an exception, which Checkpointer reports in one line) and orbax's note that a
  reader was opened read-only (as ours are on purpose)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    if record.levelno >= logging.ERROR:
      return False
    return not str(record.msg).startswith("Given directory is read only")  # our readers open read-only


class _DropAbandonedReads(logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports of orbax's reads of a checkpoint that
  already failed (the failure itself was reported in one line): asyncio logs them, with a
  traceback, when it collects the abandoned tasks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "never retrieved" not in str(record.msg) or not record.exc_info:
      return True
    return not _from_orbax(record.exc_info[1])


def _ignore_closed_loop(unraisable, previous=sys.unraisablehook) -> None:
  """After a failed read, tensorstore completes pending reads into asyncio loops that orbax has
  already closed; each raises "Event loop is closed" where nothing can catch it. Those are noise
  (the failure itself was reported); anything else goes to the previous hook."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  previous(unraisable)


# How tensorstore's errors for checkpoint files read: raised from C++, they may carry no Python frame
# of orbax or tensorstore at all (only asyncio's), so their text identifies them.
_TENSORSTORE_TEXTS = ("OCDBT database", '"zarr" driver', "orbax-checkpoint-tmp")


def _from_orbax(error: BaseException | None) -> bool:
  if error is None:
    return False
  frames = traceback.extract_tb(error.__traceback__)
  if any("orbax" in frame.filename or "tensorstore" in frame.filename for frame in frames):
    return True
  return any(text in str(error) for text in _TENSORSTORE_TEXTS)


def _quiet_thread_errors(args, previous=threading.excepthook) -> None:
  """An orbax background thread that fails while reading or writing a checkpoint also fails the
  call that waits for it, which reports it in one line; its own traceback is not printed."""
  if not _from_orbax(args.exc_value):
    previous(args)


def install() -> None:
  """Installs the filters (once per process)."""
  warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize\w*\.<locals>\.", category=RuntimeWarning)
  if sys.unraisablehook is not _ignore_closed_loop:
    sys.unraisablehook = _ignore_closed_loop
  if threading.excepthook is not _quiet_thread_errors:
    threading.excepthook = _quiet_thread_errors
  absl = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxTracebacks) for f in absl.filters):
    absl.addFilter(_DropOrbaxTracebacks())
  aio = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropAbandonedReads) for f in aio.filters):
    aio.addFilter(_DropAbandonedReads())
