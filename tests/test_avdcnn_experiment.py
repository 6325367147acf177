"""A pulse run of the AVDCNN experiment on the tiny AV-speech data: train a few steps, evaluate,
enhance a wav; bad inputs end in one line."""

import importlib.util
import json
import os
import wave

import numpy as np
import pytest

from experiments import avdcnn as exp
from multimodal_jax import audio

PULSE = [
  "--config.data_config=tiny",
  "--config.model=tiny",
  "--config.steps=4",
  "--config.batch_size=64",
  "--config.checkpoint_every=4",
  "--config.log_every=1",
  "--config.bn_batches=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, av_speech_dir):
  """A workdir with 4 steps of the tiny AV model on the tiny data (trained in this process)."""
  workdir = tmp_path_factory.mktemp("avdcnn")
  status = exp.main(["--workdir", str(workdir), f"--config.data_dir={av_speech_dir}", *PULSE])
  assert status == 0
  return workdir


def _run(capsys, workdir, data_dir, *args):
  status = exp.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out, err = capsys.readouterr()
  return status, out.strip().splitlines(), err.strip().splitlines()


@pytest.mark.slow
def test_train_writes_checkpoint_metrics_and_bn_statistics(trained):
  with open(trained / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and "audio_loss" in r and "visual_loss" in r for r in rows)
  assert os.path.exists(trained / "bn_stats" / "step_4.npz")


@pytest.mark.slow
def test_eval_prints_the_scores(trained, av_speech_dir, capsys):
  status, out, err = _run(
    capsys, trained, av_speech_dir, "--mode=eval", "--config.eval_utterances=3", "--config.eval_processes=1"
  )
  assert status == 0, err
  result = json.loads(out[-1])
  keys = {"pesq", "stoi", "pesq_noisy", "stoi_noisy", "sdi", "ssnr", "sdi_noisy", "ssnr_noisy"}
  assert keys | {"pesq_fixed_lips", "stoi_fixed_lips", "per_snr", "per_noise"} <= set(result)
  assert result["step"] == 4 and result["utterances"] == 3
  assert 1.0 <= result["pesq_noisy"] <= 4.7 and 0.0 <= result["stoi"] <= 1.0
  with open(trained / "eval.json") as f:
    assert json.load(f) == result


def _write_wav(path, signal, rate):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())


def _read_wav(path):
  with wave.open(str(path), "rb") as f:
    assert f.getsampwidth() == 2 and f.getnchannels() == 1
    return np.frombuffer(f.readframes(f.getnframes()), "<i2"), f.getframerate()


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
  """A noisy 16 kHz wav of 1.3 s and mouth frames of the right count; an 8 kHz wav of 0.9 s."""
  d = tmp_path_factory.mktemp("recording")
  rng = np.random.default_rng(0)
  n = 20800 + 123
  _write_wav(d / "noisy.wav", 0.1 * rng.normal(size=n), 16000)
  np.save(d / "lips.npy", rng.integers(0, 256, size=(audio.num_frames(n, 512, 320), 16, 24, 3), dtype=np.uint8))
  _write_wav(d / "noisy8k.wav", 0.1 * rng.normal(size=7211), 8000)
  np.save(d / "lips8k.npy", np.zeros((audio.num_frames(14422, 512, 320), 16, 24, 3), np.float32))
  return d, n


@pytest.mark.slow
def test_enhance_writes_a_wav_of_the_inputs_length(trained, av_speech_dir, recording, capsys):
  d, n = recording
  args = [f"--config.input={d / 'noisy.wav'}", f"--config.lips={d / 'lips.npy'}", f"--config.output={d / 'out.wav'}"]
  status, out, err = _run(capsys, trained, av_speech_dir, "--mode=enhance", *args)
  assert status == 0, err
  samples, rate = _read_wav(d / "out.wav")
  assert rate == 16000 and len(samples) == n and np.abs(samples).max() > 0
  # another rate is resampled (with a note), and the output comes back at the input's rate and length
  args = [f"--config.input={d / 'noisy8k.wav'}", f"--config.lips={d / 'lips8k.npy'}", f"--config.output={d / 'o8.wav'}"]
  status, out, err = _run(capsys, trained, av_speech_dir, "--mode=enhance", *args)
  assert status == 0, err
  assert any("resampled the input from 8000 Hz" in line for line in out)
  samples, rate = _read_wav(d / "o8.wav")
  assert rate == 8000 and len(samples) == 7211


@pytest.mark.parametrize(
  "case, message",
  [
    ("lips_count", "have shape (62, 16, 24, 3), expected (67, 16, 24, 3)"),
    ("lips_shape", "have shape (67, 24, 16, 3), expected (67, 16, 24, 3)"),
    ("rate_refused", "sampled at 8000 Hz but the model needs 16000 Hz"),
    ("missing_input", "does not exist"),
    ("missing_lips", "lips file"),
    ("video", "no video decoder"),
  ],
)
@pytest.mark.slow
def test_bad_enhance_inputs_are_one_line(trained, av_speech_dir, recording, tmp_path, capsys, case, message):
  if case == "video" and importlib.util.find_spec("imageio") is not None:
    pytest.skip("a video decoder is installed here; the one-line error is for machines without one")
  d, n = recording
  frames = audio.num_frames(n, 512, 320)
  assert frames == 67
  lips, wav = d / "lips.npy", d / "noisy.wav"
  extra = []
  if case == "lips_count":
    lips = tmp_path / "short.npy"
    np.save(lips, np.zeros((frames - 5, 16, 24, 3), np.uint8))
  elif case == "lips_shape":
    lips = tmp_path / "transposed.npy"
    np.save(lips, np.zeros((frames, 24, 16, 3), np.uint8))
  elif case == "rate_refused":
    wav = d / "noisy8k.wav"
    extra = ["--config.resample=false"]
  elif case == "missing_input":
    wav = tmp_path / "nothing.wav"
  elif case == "missing_lips":
    lips = tmp_path / "nothing.npy"
  elif case == "video":
    lips = tmp_path / "mouth.mp4"
    lips.write_bytes(b"\x00" * 16)
  args = [f"--config.input={wav}", f"--config.lips={lips}", f"--config.output={tmp_path / 'out.wav'}", *extra]
  status, _, err = _run(capsys, trained, av_speech_dir, "--mode=enhance", *args)
  assert status == 2 and len(err) == 1 and message in err[0], err
  assert not (tmp_path / "out.wav").exists()


def test_bad_choices_are_one_line(tmp_path, av_speech_dir, capsys):
  for key, value, message in [("modalities", "visual", "modalities='visual'"), ("fusion", "late", "fusion='late'")]:
    status, _, err = _run(capsys, tmp_path, av_speech_dir, f"--config.{key}={value}", *PULSE)
    assert status == 2 and len(err) == 1 and message in err[0], err
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_grid_dir_trains_on_a_fake_grid_corpus(tmp_path):
  """--config.grid_dir=DIR: the GRID builder's examples (2 speakers, 1 s each) feed two training steps."""
  rng = np.random.default_rng(0)
  t = np.arange(25000) / 25000
  for i, speaker in enumerate(("s1", "s2")):
    (tmp_path / "grid" / speaker).mkdir(parents=True)
    np.save(tmp_path / "grid" / speaker / "u1.npy", rng.integers(0, 256, (25, 72, 90, 3), dtype=np.uint8))
    (tmp_path / "grid" / "audio_25k" / speaker).mkdir(parents=True)
    x = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) * np.sin(np.pi * t) ** 2
    with wave.open(str(tmp_path / "grid" / "audio_25k" / speaker / "u1.wav"), "wb") as f:
      f.setnchannels(1)
      f.setsampwidth(2)
      f.setframerate(25000)
      f.writeframes((x * 32767).astype("<i2").tobytes())
  workdir = tmp_path / "run"
  args = [f"--config.grid_dir={tmp_path / 'grid'}", f"--config.data_dir={tmp_path / 'tfds'}"]
  overrides = {
    "--config.steps=4": "--config.steps=2",
    "--config.checkpoint_every=4": "--config.checkpoint_every=2",
    "--config.batch_size=64": "--config.batch_size=32",  # one 1 s training utterance: 51 frames
  }
  assert exp.main(["--workdir", str(workdir), *args, *[overrides.get(a, a) for a in PULSE]]) == 0
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert (tmp_path / "tfds" / "grid").is_dir()
