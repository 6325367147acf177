"""A pulse run of the fusion experiment through its command line: train, resume, evaluate, and
bad input that ends in one line with nothing lost."""

import json
import os

import pytest

from multimodal_jax.fusion import run as fusion_run_mod

PULSE = [
  "--config.batch_size=32",
  "--config.checkpoint_every=3",
  "--config.log_every=1",
  "--config.eval_every=0",
  "--config.eval_batch_size=200",
  "--config.mesh=data:4,fsdp:2",
]


def _cli(capsys, workdir, data_dir, *args):
  """`python -m experiments.fusion` (the module calls `fusion.run.main`), in this process: (status, stdout, stderr)."""
  capsys.readouterr()
  status = fusion_run_mod.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out, err = capsys.readouterr()
  return status, out, err


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_pulse_train_resume_and_eval_through_the_cli(tmp_path, av_digits_dir, capsys):
  status, _, err = _cli(capsys, tmp_path, av_digits_dir, "--config.steps=6", *PULSE)
  assert status == 0, err[-3000:]
  status, out, err = _cli(capsys, tmp_path, av_digits_dir, "--config.steps=8", *PULSE)
  assert status == 0, err[-3000:]
  assert "resumed from the checkpoint at step 6" in out
  steps = _logged_steps(tmp_path)
  assert steps == list(range(1, 9))  # no step logged twice
  status, out, err = _cli(capsys, tmp_path, av_digits_dir, "--mode=eval", "--config.mesh=data:8")
  assert status == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["step"] == 8
  assert {"accuracy", "accuracy_without_audio", "accuracy_without_image"} <= set(result)
  assert all(0.0 <= result[k] <= 1.0 for k in ("accuracy", "accuracy_without_audio", "accuracy_without_image"))
  with open(tmp_path / "eval.json") as f:
    assert json.load(f) == result


def _main(capsys, *argv):
  status = fusion_run_mod.main(list(argv))
  err = capsys.readouterr().err.strip().splitlines()
  return status, err


def test_unknown_config_key_is_one_line(tmp_path, capsys):
  status, err = _main(capsys, "--workdir", str(tmp_path), "--config.stepz=3")
  assert status == 2 and len(err) == 1
  assert "unknown config key 'stepz'" in err[0] and "steps" in err[0]


def test_mesh_that_does_not_fit_is_one_line(tmp_path, capsys):
  # an empty data dir: the mesh is refused before any data is prepared
  status, err = _main(
    capsys, "--workdir", str(tmp_path), f"--config.data_dir={tmp_path / 'tfds'}", "--config.mesh=data:3"
  )
  assert status == 2 and len(err) == 1 and "needs 3 devices but 8 are available" in err[0]
  assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "tfds")


def test_eval_without_checkpoint_is_one_line(tmp_path, capsys):
  status, err = _main(capsys, "--workdir", str(tmp_path), "--mode=eval")
  assert status == 2 and len(err) == 1 and "no checkpoint" in err[0]


@pytest.mark.parametrize(
  "key, value, message",
  [("fusion", "middle", "--config.fusion=middle"), ("modalities", "image,smell", "--config.modalities=image,smell")],
)
def test_bad_choices_are_one_line(tmp_path, capsys, key, value, message):
  # an empty data dir: the choice is refused before any data is prepared
  status, err = _main(
    capsys, "--workdir", str(tmp_path), f"--config.data_dir={tmp_path / 'tfds'}", f"--config.{key}={value}"
  )
  assert status == 2 and len(err) == 1 and message in err[0]


def test_missing_data_package_is_one_line(tmp_path, capsys, monkeypatch):
  from multimodal_jax.datasets import noise_sources

  monkeypatch.setattr(noise_sources, "ASTERISK_MOH_DIR", str(tmp_path / "moh"))
  status, err = _main(capsys, "--workdir", str(tmp_path / "run"), f"--config.data_dir={tmp_path / 'tfds'}")
  assert status == 2 and len(err) == 1
  assert "asterisk-moh-opsound-wav" in err[0] and "apt-get install" in err[0]
  assert not (tmp_path / "run" / "checkpoints").exists()
