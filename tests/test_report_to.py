"""`--config.report_to`: where `metrics.MetricWriter` sends the scalars besides WORKDIR/metrics.jsonl
(always written): TensorBoard, Weights & Biases (imported only when asked for), or nothing else.

wandb is optional: its tests use a stand-in module that records the calls, and, where wandb is
installed, the real package in offline mode (no network, no account)."""

import importlib.machinery
import json
import sys
import types

import pytest

from multimodal_jax import metrics as mt
from multimodal_jax.errors import UserError


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_to_names():
  # catches: a misspelt reporter passing silently (no TensorBoard, no wandb, no error)
  assert mt.parse_report_to("tensorboard") == ("tensorboard",)
  assert mt.parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")
  assert mt.parse_report_to("none") == mt.parse_report_to("") == ()
  for bad, needle in (("tensorbord", "unknown 'tensorbord'"), ("wandb,wandb", "repeated"), ("none,wandb", "'none'")):
    with pytest.raises(UserError) as excinfo:
      mt.parse_report_to(bad)
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1 and needle in message and "tensorboard, wandb" in message, message


def test_none_writes_the_jsonl_only(tmp_path):
  # catches: report_to=none still creating TensorBoard event files (or dropping the JSONL file)
  train, evaluation = mt.writers(str(tmp_path), 0, True, "none")
  train.write(1, {"loss": 0.5})
  evaluation.write(1, {"accuracy": 0.25})
  train.close()
  evaluation.close()
  assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
  assert _lines(tmp_path / "eval.jsonl") == [{"step": 1, "accuracy": 0.25}]
  assert not (tmp_path / "tensorboard").exists()


def test_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
  # catches: report_to=wandb without wandb ending in an ImportError traceback, or after files were written
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as when it is not installed
  for enabled in (True, False):  # every process stops, not only the one that logs
    with pytest.raises(UserError) as excinfo:
      mt.MetricWriter(str(tmp_path / "run"), 0, enabled=enabled, report_to="tensorboard,wandb")
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1 and 'pip install -e ".[wandb]"' in message, message
  assert not (tmp_path / "run").exists()


class _FakeRun:
  def __init__(self, calls, kwargs):
    self.calls, self.kwargs = calls, kwargs
    calls.append(("init", kwargs))

  def define_metric(self, name, step_metric=None):
    self.calls.append(("define_metric", name, step_metric))

  def log(self, values):
    self.calls.append(("log", values))

  def finish(self):
    self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
  """A stand-in `wandb` module recording init / define_metric / log / finish."""
  calls = []
  module = types.ModuleType("wandb")
  module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
  module.errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))
  module.init = lambda **kwargs: _FakeRun(calls, kwargs)
  monkeypatch.setitem(sys.modules, "wandb", module)
  return calls


def test_wandb_gets_one_run_with_each_section_on_its_own_step(tmp_path, fake_wandb):
  # catches: one wandb run per writer, or eval logged on the training step axis (wandb drops a step
  # lower than the last one logged), or the run not continued when the training resumes
  workdir = str(tmp_path / "run")
  train, evaluation = mt.writers(workdir, 0, True, "wandb", {"learning_rate": 0.1})
  train.write(1, {"loss": 2.0, "grad_norm": float("nan"), "lr": [1, 2]})  # only finite numbers go to wandb
  train.write(2, {"loss": 1.5})
  evaluation.write(2, {"accuracy": 0.5})
  train.close()
  assert ("finish",) not in fake_wandb  # the eval writer still uses the run
  evaluation.close()
  inits = [c for c in fake_wandb if c[0] == "init"]
  run_id = (tmp_path / "run" / mt.WANDB_RUN_ID_FILE).read_text().strip()
  assert len(inits) == 1 and inits[0][1]["id"] == run_id and inits[0][1]["config"] == {"learning_rate": 0.1}
  assert inits[0][1]["dir"] == workdir and inits[0][1]["resume"] == "allow"
  assert ("define_metric", "train/*", "train/step") in fake_wandb
  assert ("define_metric", "eval/*", "eval/step") in fake_wandb
  logs = [c[1] for c in fake_wandb if c[0] == "log"]
  assert logs == [
    {"train/step": 1, "train/loss": 2.0},
    {"train/step": 2, "train/loss": 1.5},
    {"eval/step": 2, "eval/accuracy": 0.5},
  ]
  assert fake_wandb[-1] == ("finish",) and not mt._WANDB_RUNS
  assert _lines(tmp_path / "run" / "metrics.jsonl")[1] == {"step": 2, "loss": 1.5}  # the JSONL file as ever
  assert not (tmp_path / "run" / "tensorboard").exists()
  fake_wandb.clear()
  resumed = mt.MetricWriter(workdir, 2, report_to="wandb")
  resumed.close()
  assert fake_wandb[0][1]["id"] == run_id  # the workdir's run, continued


def test_wandb_that_cannot_start_is_one_line(tmp_path, fake_wandb):
  # catches: wandb's own error (no API key in online mode, ...) ending the run in a traceback
  def refuse(**kwargs):
    raise sys.modules["wandb"].errors.Error("No API key configured. Use `wandb login` to log in.\nmore")

  sys.modules["wandb"].init = refuse
  with pytest.raises(UserError) as excinfo:
    mt.MetricWriter(str(tmp_path), 0, report_to="wandb")
  message = str(excinfo.value)
  assert len(message.splitlines()) == 1 and "No API key configured" in message and "WANDB_MODE=offline" in message
  assert not mt._WANDB_RUNS


def test_wandb_offline_mode_needs_no_network(tmp_path, monkeypatch):
  # catches: the wandb writer needing an account or network when WANDB_MODE=offline
  pytest.importorskip("wandb", reason="the offline run needs the wandb extra")
  for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
    monkeypatch.setenv(name, str(tmp_path / name.lower()))
  workdir = tmp_path / "run"
  for start in (0, 2):  # a run, then its resumption
    train, evaluation = mt.writers(str(workdir), start, True, "wandb", {"steps": 4})
    for step in (start + 1, start + 2):
      train.write(step, {"loss": 1.0 / step})
    evaluation.write(start + 2, {"accuracy": 0.5})
    train.close()
    evaluation.close()
  run_id = (workdir / mt.WANDB_RUN_ID_FILE).read_text().strip()
  runs = sorted(p.name for p in (workdir / "wandb").glob("offline-run-*"))
  assert runs and all(name.endswith("-" + run_id) for name in runs), runs
  assert [r["step"] for r in _lines(workdir / "metrics.jsonl")] == [1, 2, 3, 4]
  assert not mt._WANDB_RUNS
