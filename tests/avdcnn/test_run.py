"""A pulse run of the AVDCNN experiment on the tiny AV-speech data: train a few steps, evaluate,
enhance a wav; bad inputs end in one line."""

import importlib.util
import json
import os
import wave

import jax
import numpy as np
import pytest

from multimodal_jax import audio
from multimodal_jax.avdcnn import config as exp_config
from multimodal_jax.avdcnn import run as exp_run
from tests import runs

PULSE = runs.TRAIN_ARGS["avdcnn"]  # the session's trained run: 4 steps of the tiny model on the tiny data


@pytest.fixture(scope="module")
def trained(trained_runs):
  """This module's copy of the session's AVDCNN run: 4 steps of the tiny AV model on the tiny data."""
  return trained_runs("avdcnn")


def _run(capsys, workdir, data_dir, *args):
  status = exp_run.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out, err = capsys.readouterr()
  return status, out.strip().splitlines(), err.strip().splitlines()


@pytest.mark.slow
def test_train_writes_checkpoint_metrics_and_bn_statistics_in_the_checkpoint(trained, av_speech_dir):
  with open(trained / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and "audio_loss" in r and "visual_loss" in r for r in rows)
  assert not os.path.exists(trained / "bn_stats")  # no side files: the statistics are in the checkpoint
  from multimodal_jax import sharding
  from multimodal_jax.avdcnn import model as avdcnn
  from multimodal_jax.avdcnn.frames import FrameSource
  from multimodal_jax.datasets import av_speech
  from multimodal_jax.eval import from_checkpoint

  config = exp_config.get_config()
  config.update({"data_config": "tiny", "model": "tiny", "batch_size": 64, "bn_batches": 2})
  model = avdcnn.AVDCNN(exp_config.model_config(config))
  mesh = sharding.make_mesh("data:-1")
  step, params, stats = from_checkpoint.restore_params(
    str(trained), avdcnn.make_init_params(model), mesh, model_state=avdcnn.batch_stats_shapes(model)
  )
  # they are the population statistics of the saved params over the frames of seed + 1's permutation
  frames = FrameSource(av_speech.load(av_speech_dir, config="tiny")["train"], config.target_floor)
  expected = avdcnn.population_batch_stats(model, params, frames.sample_batches(1, 64, 2))
  assert step == 4
  for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


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


@pytest.mark.slow
def test_enhance_a_directory_writes_one_file_per_input(trained, av_speech_dir, tmp_path, capsys):
  import soundfile

  rng = np.random.default_rng(1)
  inputs, lips = tmp_path / "in", tmp_path / "lips"
  inputs.mkdir()
  lips.mkdir()
  lengths = {"a": 17000, "b": 9000}
  soundfile.write(inputs / "a.wav", 0.1 * rng.normal(size=(17000, 2)), 16000)  # stereo: mixed down
  soundfile.write(inputs / "b.flac", 0.1 * rng.normal(size=4500), 8000)  # another rate and format
  (inputs / "notes.txt").write_text("not audio: ignored")
  np.save(lips / "a.npy", np.zeros((audio.num_frames(17000), 16, 24, 3), np.uint8))
  np.save(lips / "b.npy", np.zeros((audio.num_frames(9000), 16, 24, 3), np.uint8))
  out = tmp_path / "out"
  args = [f"--config.input={inputs}", f"--config.lips={lips}", f"--config.output={out}"]
  status, lines, err = _run(capsys, trained, av_speech_dir, "--mode=enhance", *args)
  assert status == 0, err
  assert sorted(os.listdir(out)) == ["a.wav", "b.wav"]
  for stem, rate in (("a", 16000), ("b", 8000)):
    info = soundfile.info(str(out / f"{stem}.wav"))
    assert (info.samplerate, info.channels, info.frames * 16000 // rate) == (rate, 1, lengths[stem])
  assert sum(line.startswith("{") for line in lines) == 2


@pytest.mark.parametrize("case, message", [
  ("missing_lips", "no mouth frames for input"),
  ("unreadable", "is not a readable audio file"),
  ("empty", "holds 0 samples: too short"),
  ("no_audio", "holds no audio file"),
])  # fmt: skip
@pytest.mark.slow
def test_bad_enhance_directories_are_one_line(trained, av_speech_dir, tmp_path, capsys, case, message):
  import soundfile

  inputs, lips = tmp_path / "in", tmp_path / "lips"
  inputs.mkdir()
  lips.mkdir()
  if case != "no_audio":
    soundfile.write(inputs / "a.wav", np.zeros(16000), 16000)
    np.save(lips / "a.npy", np.zeros((audio.num_frames(16000), 16, 24, 3), np.uint8))
  if case == "missing_lips":
    soundfile.write(inputs / "b.wav", np.zeros(16000), 16000)
  elif case == "unreadable":
    (inputs / "b.wav").write_bytes(b"RIFF junk")
    np.save(lips / "b.npy", np.zeros((1, 16, 24, 3), np.uint8))
  elif case == "empty":
    soundfile.write(inputs / "b.wav", np.zeros(0), 16000)
    np.save(lips / "b.npy", np.zeros((1, 16, 24, 3), np.uint8))
  args = [f"--config.input={inputs}", f"--config.lips={lips}", f"--config.output={tmp_path / 'out'}"]
  status, _, err = _run(capsys, trained, av_speech_dir, "--mode=enhance", *args)
  assert status == 2 and len(err) == 1 and message in err[0], err
  assert not (tmp_path / "out").exists()


def test_bad_choices_are_one_line(tmp_path, capsys):
  # Catches a bad choice noticed only after the data is built or the workdir written (neither may exist).
  choices = [
    ("modalities", "visual", "--config.modalities=visual: expected one of"),
    ("fusion", "late", "--config.fusion=late: expected one of"),
    ("loss", "l1", "--config.loss=l1: expected one of"),
  ]
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  for key, value, message in choices:
    status, _, err = _run(capsys, workdir, data_dir, f"--config.{key}={value}", *PULSE)
    assert status == 2 and len(err) == 1 and message in err[0], err
  assert not workdir.exists() and not data_dir.exists()


@pytest.mark.parametrize("own_noise", [False, True])
@pytest.mark.slow
def test_grid_dir_trains_on_a_fake_grid_corpus(tmp_path, monkeypatch, own_noise):
  """--config.grid_dir=DIR: the GRID builder's examples (2 speakers, 1 s each) feed two training steps;
  with --config.noise_dir=DIR, the user's noise files are mixed in and no Debian package is needed."""
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
  if own_noise:
    import soundfile

    from multimodal_jax.datasets import av_speech

    (tmp_path / "noise").mkdir()
    soundfile.write(tmp_path / "noise" / "hum.flac", 0.1 * np.sin(np.arange(44100) * 0.05)[:, None].repeat(2, 1), 44100)
    soundfile.write(tmp_path / "noise" / "hiss.wav", 0.1 * rng.normal(size=8000), 8000)
    args.append(f"--config.noise_dir={tmp_path / 'noise'}")
    monkeypatch.setattr(av_speech, "missing_packages", lambda: [("nothing-installed", "no noise packages")])
  overrides = {
    "--config.steps=4": "--config.steps=2",
    "--config.checkpoint_every=4": "--config.checkpoint_every=2",
    "--config.batch_size=64": "--config.batch_size=32",  # one 1 s training utterance: 51 frames
  }
  assert exp_run.main(["--workdir", str(workdir), *args, *[overrides.get(a, a) for a in PULSE]]) == 0
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert (tmp_path / "tfds" / "grid").is_dir()
  if own_noise:
    from multimodal_jax.datasets import grid

    sources = grid.load(
      str(tmp_path / "grid"), str(tmp_path / "tfds"), noise_config="tiny", noise_dir=str(tmp_path / "noise")
    )
    noises = {source[i]["noise"] for source in sources.values() for i in range(len(source))}
    assert noises == {"hiss", "hum"}  # hiss (train), hum (test): the last file is held out
