"""Where training metrics go: a JSONL file, TensorBoard event files and a progress bar.

Only process 0 writes. Nothing here imports the rest of the package but `files`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from multimodal_jax.files import atomic_write


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to WORKDIR/<name>.jsonl and TensorBoard scalars
  (under WORKDIR/tensorboard/<name>; name "metrics" for training, "eval" for evaluation).

  On resume the JSONL file is first truncated to the steps up to `start_step`, so a step
  logged after the last checkpoint of an interrupted run is not logged twice. Paths are
  `etils.epath` paths: on storage that cannot append (`gs://...`), the file is rewritten whole at
  each write.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True, name: str = "metrics"):
    self.enabled = enabled
    self.path = epath.Path(workdir) / f"{name}.jsonl"
    self._remote = "://" in os.fspath(workdir)
    self._tb = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = _truncate_jsonl(self.path, start_step)
    if not self._remote:
      self._file = self.path.open("a")
    try:
      from tensorboardX import SummaryWriter  # optional: events only when installed
    except ImportError:
      print("note: tensorboardX is not installed; no TensorBoard events are written", file=sys.stderr)
    else:
      if self._remote and not _remote_events_supported(os.fspath(workdir)):
        return
      self._tb = SummaryWriter(
        os.fspath(epath.Path(workdir) / "tensorboard" / name), purge_step=start_step + 1 if start_step else None
      )

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    line = json.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      atomic_write(self.path, lambda f: f.writelines(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if not self.enabled:
      return
    if not self._remote:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _remote_events_supported(workdir: str) -> bool:
  """tensorboardX writes to gs:// through google-cloud-storage and to s3:// through boto3."""
  client = {"gs": "google.cloud.storage", "s3": "boto3"}.get(workdir.split("://", 1)[0])
  try:
    found = client is not None and importlib.util.find_spec(client) is not None
  except ModuleNotFoundError:  # the parent package (google.cloud) is missing
    found = False
  if not found:
    print(f"note: no TensorBoard events in {workdir} (tensorboardX needs {client or 'a local path'})", file=sys.stderr)
  return found


def _truncate_jsonl(path, start_step: int) -> list[str]:
  """Drops lines with step > start_step (left by a run that died after its last checkpoint);
  returns the lines kept."""
  path = epath.Path(path)
  if not path.exists():
    return []
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= start_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # a line cut by a crash
  if kept != lines:  # rewritten atomically: a kill here leaves the old or the new file whole
    atomic_write(path, lambda f: f.writelines(kept))
  return kept


class Progress:
  """A tqdm bar when stdout is a terminal, nothing otherwise."""

  def __init__(self, start: int, total: int, enabled: bool = True):
    self._bar = None
    if enabled and sys.stdout.isatty():
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, loss: float | None = None) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class Throughput:
  """Examples per second between two calls of `rate`."""

  def __init__(self):
    self._time = time.perf_counter()
    self._examples = 0

  def add(self, examples: int) -> None:
    self._examples += examples

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self._examples / max(now - self._time, 1e-9)
    self._time, self._examples = now, 0
    return rate
