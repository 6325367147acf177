"""Workdirs on cluster storage: every file of a run that our code writes or reads goes through
`etils.epath`, so a `gs://` workdir stays remote. Tested with fsspec's in-memory filesystem standing
in for the gs:// protocol (no network), and with `os.path` made to refuse any URI."""

import importlib
import json
import os
import posixpath

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from multimodal_jax import checkpoint, cli, files, metrics
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.files import write_json


class _RefusingPath:
  """`os.path` for our modules, raising when handed a URI: a workdir must not go through it."""

  def __getattr__(self, name):
    fn = getattr(posixpath, name)
    if not callable(fn):
      return fn

    def wrapped(*args, **kw):
      if any("://" in os.fspath(a) for a in args if isinstance(a, (str, os.PathLike))):
        raise AssertionError(f"os.path.{name}{args} got a URI")
      return fn(*args, **kw)

    return wrapped


class _OsWithRefusingPath:
  path = _RefusingPath()

  def __getattr__(self, name):
    return getattr(os, name)


@pytest.fixture
def bucket(monkeypatch):
  """gs:// served from memory (no network); our modules' os.path refuses URIs."""
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
  MemoryFileSystem.store.clear()
  for module in (checkpoint, metrics, files, cli):
    monkeypatch.setattr(module, "os", _OsWithRefusingPath())
  yield "gs://bucket/run"
  for protocol in ("gs", "gcs"):
    importlib.import_module("fsspec.registry")._registry.pop(protocol, None)  # back to the real implementations


def test_metrics_resume_and_eval_json_stay_remote(bucket, capsys):
  writer = metrics.MetricWriter(bucket, 0)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  writer = metrics.MetricWriter(bucket, 2)  # resumed at step 2: step 3 is dropped, then logged again
  writer.write(3, {"loss": 0.25})
  writer.close()
  rows = [json.loads(line) for line in epath.Path(f"{bucket}/metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  from_checkpoint.report(bucket, {"step": 3, "accuracy": 0.5})
  assert json.loads(epath.Path(f"{bucket}/eval.json").read_text()) == {"step": 3, "accuracy": 0.5}
  assert "no TensorBoard events" in capsys.readouterr().err
  assert not os.path.exists("gs:") and not os.path.exists("bucket")  # nothing landed in a local folder
  cli.check_workdir(bucket, create=True)  # remote: left to the storage client


def test_saved_steps_and_config_read_from_remote_checkpoints(bucket):
  for step in (4, 8):
    (epath.Path(bucket) / "checkpoints" / str(step) / "config").mkdir(parents=True, exist_ok=True)
    write_json(f"{bucket}/checkpoints/{step}/config/metadata", {"steps": step})
  (epath.Path(bucket) / "checkpoints" / "12.orbax-checkpoint-tmp").mkdir(parents=True)  # unfinished
  assert checkpoint.saved_steps(bucket) == [4, 8]
  assert checkpoint.read_config(bucket) == {"steps": 8}
  assert str(checkpoint.checkpoint_dir(bucket)) == f"{bucket}/checkpoints"
  with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoint in gs://bucket/other"):
    checkpoint.read_config("gs://bucket/other")
