"""Where training metrics go: a JSONL file (always), the reporters `report_to` names (TensorBoard
event files, a Weights & Biases run) and a progress bar.

`report_to` is a comma list of `tensorboard` and `wandb` (or `none`: the JSONL file only). wandb is
imported only when asked for (`pip install -e ".[wandb]"`); it logs online, or with
`WANDB_MODE=offline` into WORKDIR/wandb/ without network (`wandb sync` uploads it later). Only
process 0 writes. Nothing here imports the rest of the package but `files` and `errors`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from multimodal_jax.errors import UserError
from multimodal_jax.files import atomic_write

REPORTERS = ("tensorboard", "wandb")
WANDB_RUN_ID_FILE = "wandb_run_id.txt"  # the workdir's wandb run, continued when the run resumes


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def parse_report_to(value: str) -> tuple[str, ...]:
  """`report_to` -> the reporters it names, in order: "tensorboard,wandb" -> ("tensorboard", "wandb");
  "none" or "" -> () (the JSONL file only). One-line UserError for an unknown or repeated name."""
  names = [n.strip() for n in value.split(",") if n.strip()]
  if names == ["none"]:
    return ()
  unknown = [n for n in names if n not in REPORTERS]
  if unknown or len(set(names)) != len(names):
    raise UserError(
      f"--config.report_to={value}: expected a comma list of {', '.join(REPORTERS)} (or none); "
      f"{'unknown ' + repr(unknown[0]) if unknown else 'a name is repeated'}"
    )
  return tuple(names)


def require_wandb() -> None:
  """One-line UserError unless the wandb package is installed (it is not imported here)."""
  try:
    found = importlib.util.find_spec("wandb") is not None
  except (ImportError, ValueError):
    found = False
  if not found:
    raise UserError('--config.report_to=wandb needs the wandb package: pip install -e ".[wandb]"')


def report_to_ok(value: Any) -> bool:
  """The config rule of `report_to` (its UserError names what is wrong)."""
  return isinstance(value, str) and parse_report_to(value) is not None


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to WORKDIR/<name>.jsonl and sends the scalars to the
  reporters of `report_to`: TensorBoard (under WORKDIR/tensorboard/<name>; name "metrics" for
  training, "eval" for evaluation) and wandb (one run per workdir, keys `train/...` and `eval/...`
  each against its own step).

  On resume the JSONL file is first truncated to the steps up to `start_step`, so a step
  logged after the last checkpoint of an interrupted run is not logged twice; the wandb run of the
  workdir is continued (its id is kept in WORKDIR/wandb_run_id.txt). Paths are `etils.epath`
  paths: on storage that cannot append (`gs://...`), the file is rewritten whole at each write.
  `config` (the run's config as a dict) is recorded in the wandb run.
  """

  def __init__(
    self,
    workdir: str,
    start_step: int = 0,
    enabled: bool = True,
    name: str = "metrics",
    report_to: str = "tensorboard",
    config: Mapping[str, Any] | None = None,
  ):
    self.enabled = enabled
    self.name = name
    self.path = epath.Path(workdir) / f"{name}.jsonl"
    self._remote = "://" in os.fspath(workdir)
    self._tb = None
    self._wandb = None
    reporters = parse_report_to(report_to)
    if "wandb" in reporters:  # on every process (not only the one that logs), before any file is touched
      require_wandb()
    if not enabled:
      return
    if "wandb" in reporters:
      self._wandb = _WandbRun.acquire(os.fspath(workdir), config)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = _truncate_jsonl(self.path, start_step)
    if not self._remote:
      self._file = self.path.open("a")
    if "tensorboard" in reporters:
      self._tb = _tensorboard(os.fspath(workdir), name, start_step, self._remote)

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
    scalars = {k: v for k, v in record.items() if k != "step" and _is_scalar(v)}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(_WANDB_SECTION.get(self.name, self.name), int(step), scalars)

  def close(self) -> None:
    if not self.enabled:
      return
    if not self._remote:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.release()
      self._wandb = None


def writers(
  workdir: str, start_step: int, enabled: bool, report_to: str = "tensorboard", config: Mapping[str, Any] | None = None
) -> tuple[MetricWriter, MetricWriter]:
  """The training and the evaluation writer of a run (`MetricWriter`s "metrics" and "eval"), sending
  to the same reporters (and the same wandb run)."""
  train = MetricWriter(workdir, start_step, enabled, "metrics", report_to, config)
  return train, MetricWriter(workdir, start_step, enabled, "eval", report_to, config)


def _is_scalar(value: Any) -> bool:
  """A finite number (a bool counts, as 0 / 1): what the reporters plot."""
  return isinstance(value, (int, float)) and math.isfinite(value)


def _tensorboard(workdir: str, name: str, start_step: int, remote: bool):
  """A tensorboardX SummaryWriter of WORKDIR/tensorboard/<name>, or None (not installed, or remote
  storage it cannot write)."""
  try:
    from tensorboardX import SummaryWriter  # optional: events only when installed
  except ImportError:
    print("note: tensorboardX is not installed; no TensorBoard events are written", file=sys.stderr)
    return None
  if remote and not _remote_events_supported(workdir):
    return None
  return SummaryWriter(
    os.fspath(epath.Path(workdir) / "tensorboard" / name), purge_step=start_step + 1 if start_step else None
  )


def _run_name(workdir: str) -> str:
  """The wandb run's name: the workdir's last two path parts (`runs/clip-b32`, `ld/denoiser`)."""
  parts = [p for p in workdir.split("://")[-1].split("/") if p]
  return "/".join(parts[-2:]) or workdir


# wandb key prefix of each writer name: train/loss, eval/accuracy.
_WANDB_SECTION = {"metrics": "train"}


class _WandbRun:
  """The wandb run of a workdir, shared by its writers (training and evaluation) and finished when the
  last of them closes. Each section's keys are logged against its own step key (`train/step`,
  `eval/step`), so the sections may log the same or earlier steps in any order, and a resumed run
  may log again steps its previous attempt logged after its last checkpoint."""

  def __init__(self, workdir: str, config: Mapping[str, Any] | None):
    require_wandb()
    import wandb

    self.workdir, self.users, self._sections = workdir, 0, set()
    remote = "://" in workdir
    id_file = epath.Path(workdir) / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)  # wandb: [a-z0-9]+
    folder = None if remote else workdir  # wandb writes its files locally (./wandb for a remote workdir)
    if folder is not None:
      os.makedirs(folder, exist_ok=True)
    try:
      self._run = wandb.init(
        project=os.environ.get("WANDB_PROJECT") or "multimodal_jax",
        name=None if os.environ.get("WANDB_NAME") else _run_name(workdir),
        id=run_id,
        resume="allow",
        dir=folder,
        config=dict(config) if config is not None else None,
      )
    except (wandb.errors.Error, OSError) as e:  # no API key, no network, a folder it cannot write ...
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(
        f"--config.report_to=wandb: wandb could not start a run ({first}); log in with `wandb login`, or set "
        "WANDB_MODE=offline to log without network"
      ) from None
    if not id_file.exists():
      atomic_write(id_file, lambda f: f.write(run_id + "\n"))

  @classmethod
  def acquire(cls, workdir: str, config: Mapping[str, Any] | None) -> _WandbRun:
    run = _WANDB_RUNS.get(workdir)
    if run is None:
      run = _WANDB_RUNS[workdir] = cls(workdir, config)
    run.users += 1
    return run

  def log(self, section: str, step: int, scalars: Mapping[str, float]) -> None:
    if section not in self._sections:
      self._run.define_metric(f"{section}/step")
      self._run.define_metric(f"{section}/*", step_metric=f"{section}/step")
      self._sections.add(section)
    self._run.log({f"{section}/step": step, **{f"{section}/{k}": v for k, v in scalars.items()}})

  def release(self) -> None:
    self.users -= 1
    if self.users == 0:
      _WANDB_RUNS.pop(self.workdir, None)
      self._run.finish()


_WANDB_RUNS: dict[str, _WandbRun] = {}  # the open run of each workdir


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
