"""Tests for the GRID builder on a tiny fake corpus made here (2 speakers x 2 utterances, no decoder)."""

import sys
import wave

import numpy as np
import pytest

from multimodal_jax import audio, errors
from multimodal_jax.datasets import grid
from multimodal_jax.eval import images

FRAMES, HEIGHT, WIDTH = 25, 72, 90  # 1 s of 25 fps video.
AUDIO_RATE = 25000


def _frames(seed: int) -> np.ndarray:
  """Face-like frames whose mouth (a dark ellipse inside MOUTH_BOX) opens and closes."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:HEIGHT, :WIDTH]
  top, left, height, width = grid.MOUTH_BOX
  cy, cx = (top + height / 2) * HEIGHT, (left + width / 2) * WIDTH
  out = np.empty((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
  for f in range(FRAMES):
    opening = 1 + 5 * abs(np.sin(np.pi * f / 8))
    mouth = ((cols - cx) / 10) ** 2 + ((rows - cy) / opening) ** 2 < 1
    frame = np.where(mouth[..., None], [40, 10, 15], [200, 150, 120]) + rng.integers(-5, 6, (HEIGHT, WIDTH, 3))
    out[f] = np.clip(frame, 0, 255)
  return out


def _write_wav(path, seed: int) -> None:
  t = np.arange(AUDIO_RATE) / AUDIO_RATE
  x = 0.3 * np.sin(2 * np.pi * (150 + 20 * seed) * t) * np.sin(np.pi * t) ** 2
  path.parent.mkdir(parents=True, exist_ok=True)
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(AUDIO_RATE)
    w.writeframes((x * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """GRID_DIR with s1 (u1.npy, u2/ PNG frames) and s2 (v1.npy, v2.npy), audio_25k and one alignment."""
  root = tmp_path_factory.mktemp("grid")
  frames = {}
  for seed, (speaker, name) in enumerate((("s1", "u1"), ("s1", "u2"), ("s2", "v1"), ("s2", "v2"))):
    frames[name] = _frames(seed)
    folder = root / speaker
    folder.mkdir(exist_ok=True)
    if name == "u2":
      (folder / name).mkdir()
      for f, frame in enumerate(frames[name]):
        images.save_png(str(folder / name / f"{f:03d}.png"), frame)
    else:
      np.save(folder / f"{name}.npy", frames[name])
    _write_wav(root / "audio_25k" / speaker / f"{name}.wav", seed)
  (root / "alignments" / "s1").mkdir(parents=True)
  (root / "alignments" / "s1" / "u1.align").write_text(
    "0 10000 sil\n10000 30000 bin\n30000 52000 blue\n52000 75000 sil\n"
  )
  return root, frames


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
  root, _ = corpus
  return grid.load(str(root), str(tmp_path_factory.mktemp("tfds")), test_speakers=("s2",), noise_config="tiny")


@pytest.mark.slow
def test_fake_corpus_builds_with_av_speech_features(built):
  from multimodal_jax.datasets import av_speech, noise_bank

  assert len(built["train"]) == 2
  assert len(built["test"]) == 2 * len(noise_bank.TEST_NOISES) * len(av_speech.TEST_SNRS)
  texts = set()
  for split, speaker in (("train", "grid/s1"), ("test", "grid/s2")):
    for i in range(len(built[split])):
      ex = built[split][i]
      assert ex["speaker"] == speaker
      assert ex["clean"].shape == ex["noisy"].shape == (16000,)  # 1 s at 25 kHz -> 16 kHz.
      assert ex["clean"].dtype == ex["noisy"].dtype == np.float32
      assert ex["lips"].shape == (audio.num_frames(16000, 512, 320), 16, 24, 3) and ex["lips"].dtype == np.uint8
      clean = ex["clean"].astype(np.float64)
      snr = 10 * np.log10(np.sum(clean**2) / np.sum((ex["noisy"] - clean) ** 2))
      assert snr == pytest.approx(float(ex["snr"]), abs=0.1)
      texts.add(ex["text"])
  assert texts == {"bin blue", ""}
  assert {built["test"][i]["noise"] for i in range(len(built["test"]))} == set(noise_bank.TEST_NOISES)


@pytest.mark.slow
def test_lips_are_the_mouth_box_at_50_fps(built, corpus):
  _, frames = corpus
  ex = next(built["train"][i] for i in range(2) if built["train"][i]["text"] == "bin blue")
  crops = grid.crop_mouth(frames["u1"])
  lips = ex["lips"].astype(np.float32)
  for f in range(FRAMES - 1):  # Frame t is at t * 20 ms: even t on a video frame, odd t between two.
    np.testing.assert_allclose(lips[2 * f], crops[f], atol=0.51)
    np.testing.assert_allclose(lips[2 * f + 1], (crops[f] + crops[f + 1]) / 2, atol=0.51)
  darkness = 255 - crops.mean(axis=(1, 2, 3))  # The mouth opens and closes in the crops.
  assert darkness.max() > darkness.min() + 20


def test_crop_resizes_by_area():
  frame = np.zeros((1, 40, 60, 3), np.uint8)
  frame[:, :, 30:] = 255
  whole = grid.crop_mouth(frame, box=None)
  assert whole.shape == (1, 16, 24, 3)
  np.testing.assert_allclose(whole[0, :, :12], 0.0, atol=1e-4)
  np.testing.assert_allclose(whole[0, :, 12:], 255.0, atol=1e-3)
  flat = grid.crop_mouth(np.full((2, 37, 53, 3), 77, np.uint8))
  np.testing.assert_allclose(flat, 77.0, atol=1e-3)


def _message(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_missing_or_empty_directory_is_one_line(tmp_path):
  with pytest.raises(errors.UserError) as excinfo:
    grid.load(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
  message = _message(excinfo)
  assert str(tmp_path / "nowhere") in message and "--config.grid_dir" in message
  (tmp_path / "empty" / "s1").mkdir(parents=True)
  with pytest.raises(errors.UserError) as excinfo:
    grid.load(str(tmp_path / "empty"), str(tmp_path / "tfds"))
  assert "holds no utterance" in _message(excinfo)


def test_video_without_a_decoder_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "av", None)
  monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
  path = tmp_path / "bbaf2n.mpg"
  path.write_bytes(b"\x00\x00\x01\xba")
  with pytest.raises(errors.UserError) as excinfo:
    grid.read_frames(str(path))
  assert "pip install av" in _message(excinfo)


def test_speaker_split(corpus):
  assert grid.split_speakers(["s1", "s2", "s10", "s3"], None) == ({"s1", "s2", "s3"}, {"s10"})
  with pytest.raises(errors.UserError, match="not in the GRID directory"):
    grid.split_speakers(["s1", "s2"], ("s9",))
  with pytest.raises(errors.UserError, match="leave at least one"):
    grid.split_speakers(["s1"], ("s1",))
  root, _ = corpus
  items = grid.scan(str(root))
  assert [(i.speaker, i.name) for i in items] == [("s1", "u1"), ("s1", "u2"), ("s2", "v1"), ("s2", "v2")]
  assert grid.read_alignment(items[0].align) == "bin blue" and items[1].align == ""
