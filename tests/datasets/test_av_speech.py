"""Tests for AV-speech (AVDCNN's embedded data): the tiny build, rendered lips, noise, FLAC decoding."""

import numpy as np
import pytest

from multimodal_jax import audio, errors
from multimodal_jax.datasets import av_speech, espeak, lips, noise_bank, noise_sources, speech_sources


@pytest.fixture(scope="module")
def sources(av_speech_dir):
  return av_speech.load(av_speech_dir, config="tiny")


@pytest.fixture(scope="module")
def examples(sources):
  return {split: [src[i] for i in range(len(src))] for split, src in sources.items()}


def _opening(mouths: np.ndarray) -> np.ndarray:
  """How open each rendered mouth is, float32 `[T]`: the share of pixels much darker than the frame's
  median (the mouth cavity), in uint8 `[T, H, W, 3]`."""
  luma = np.asarray(mouths, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  median = np.median(luma.reshape(len(luma), -1), axis=1)[:, None, None]
  return (luma < 0.5 * median).mean(axis=(1, 2)).astype(np.float32)


def _log_energy(clean: np.ndarray) -> np.ndarray:
  """Frame log energy (same frames as the lips), floored 60 dB below the loudest frame."""
  power = lips.frame_power(clean).sum(axis=1)
  return np.log10(np.maximum(power, power.max() * 1e-6))


@pytest.mark.slow
def test_sizes_shapes_and_dtypes(examples):
  sizes = av_speech.CONFIGS["tiny"]
  assert len(examples["train"]) == sizes.train_synth + sizes.train_real
  test_utterances = sizes.test_synth + sizes.test_real
  assert len(examples["test"]) == test_utterances * len(noise_bank.TEST_NOISES) * len(av_speech.TEST_SNRS)
  for split in ("train", "test"):
    for ex in examples[split]:
      assert set(ex) == {"clean", "noisy", "lips", "snr", "noise", "speaker", "text"}
      n = len(ex["clean"])
      assert ex["clean"].dtype == np.float32 and ex["clean"].shape == (n,)
      assert ex["noisy"].dtype == np.float32 and ex["noisy"].shape == (n,)
      assert 0.5 * av_speech.SAMPLE_RATE < n < 4 * av_speech.SAMPLE_RATE
      assert np.abs(ex["noisy"]).max() <= 1.0 and np.abs(ex["clean"]).max() <= 1.0
      assert ex["lips"].dtype == np.uint8
      assert ex["lips"].shape == (audio.num_frames(n, 512, 320), 16, 24, 3)
      assert ex["snr"].dtype == np.float32 and ex["snr"].shape == ()
      assert all(isinstance(ex[k], str) for k in ("noise", "speaker", "text"))
  assert len({len(ex["clean"]) for ex in examples["train"]}) > 10  # Lengths vary.
  assert any(ex["text"] for ex in examples["train"])


@pytest.mark.slow
def test_noisy_is_clean_plus_noise_at_the_labelled_snr(examples):
  for split in ("train", "test"):
    for ex in examples[split]:
      clean = ex["clean"].astype(np.float64)
      noise = ex["noisy"].astype(np.float64) - clean
      snr = 10 * np.log10(np.sum(clean**2) / np.sum(noise**2))
      assert snr == pytest.approx(float(ex["snr"]), abs=0.1)
  assert {float(ex["snr"]) for ex in examples["test"]} == set(av_speech.TEST_SNRS)
  assert {float(ex["snr"]) for ex in examples["train"]} <= set(av_speech.TRAIN_SNRS)


@pytest.mark.slow
def test_test_speakers_and_noises_are_unseen_in_training(examples):
  assert not set(noise_bank.TRAIN_NOISES) & set(noise_bank.TEST_NOISES)
  train_speakers = {ex["speaker"] for ex in examples["train"]}
  test_speakers = {ex["speaker"] for ex in examples["test"]}
  assert not train_speakers & test_speakers
  assert "asterisk/Carlo" in test_speakers
  assert any(s.startswith("espeak/") for s in test_speakers)
  assert {ex["noise"] for ex in examples["train"]} <= set(noise_bank.TRAIN_NOISES)
  assert {ex["noise"] for ex in examples["test"]} == set(noise_bank.TEST_NOISES)
  train_variants = {s.split("+")[-1] for s in train_speakers if s.startswith("espeak/")}
  assert train_variants <= set(av_speech.TRAIN_VARIANTS)
  assert not set(av_speech.TRAIN_VARIANTS) & set(av_speech.TEST_VARIANTS)


@pytest.mark.slow
def test_rendered_lips_follow_the_speech(examples):
  recorded = [ex for ex in examples["train"] if not ex["speaker"].startswith("espeak/")]
  synthesised = [ex for ex in examples["train"] if ex["speaker"].startswith("espeak/")]
  assert recorded and synthesised

  def correlation(ex):
    return np.corrcoef(_opening(ex["lips"]), _log_energy(ex["clean"]))[0, 1]

  assert np.median([correlation(ex) for ex in recorded]) > 0.5
  assert np.median([correlation(ex) for ex in synthesised]) > 0.3
  for ex in recorded + synthesised:  # Closed mouth in the silence before the speech (0.1-0.4 s).
    energy = _log_energy(ex["clean"])
    onset = int(np.argmax(energy > energy.max() - 5))
    assert onset >= 4
    assert _opening(ex["lips"][: onset - 3]).max() < 0.04  # A closed slit; open is > 0.1.
  # The same utterance has the same lips whatever the noise and SNR.
  first = [ex for ex in examples["test"] if ex["speaker"] == examples["test"][0]["speaker"]]
  assert len(first) == len(noise_bank.TEST_NOISES) * len(av_speech.TEST_SNRS)
  for ex in first[1:]:
    np.testing.assert_array_equal(ex["lips"], first[0]["lips"])


def test_phoneme_visemes_and_fixed_mouth():
  assert lips.viseme("p") == lips.viseme("m") == "closed"
  assert lips.viseme("aI") == "open" and lips.viseme("u:") == "close_round" and lips.viseme("_:") == "pause"
  samples = 16000
  phonemes = ((0, "_"), (4000, "a"), (8000, "m"), (12000, "_"))
  shapes = lips.shapes_from_phonemes(phonemes, samples)
  frames = lips.frame_samples(samples)
  assert shapes.shape == (len(frames), len(lips.SHAPE_PARAMS))
  opening = shapes[:, 0]
  assert opening[(frames > 5000) & (frames < 7000)].min() > 0.8  # 'a' open.
  assert opening[(frames > 9500) & (frames < 11000)].max() < 0.1  # 'm' closed.
  assert opening[frames < 3000].max() < 0.05  # Silence before.
  mouth = lips.fixed_mouth()
  assert mouth.shape == (16, 24, 3) and mouth.dtype == np.uint8
  tiled = lips.fixed_mouth("espeak/en-us+m1", num_frames=7)
  assert tiled.shape == (7, 16, 24, 3)
  assert (tiled == tiled[0]).all()
  assert _opening(tiled).max() < 0.04  # Closed.
  open_mouth = lips.draw(np.array([[1.0, 0.5, 0.0, 0.0, 0.0]]), lips.appearance("x"))
  assert _opening(np.rint(open_mouth * 255).astype(np.uint8))[0] > 0.1


@pytest.mark.slow
def test_rebuild_is_identical(examples, tmp_path):
  again = av_speech.load(str(tmp_path), config="tiny")
  for split in ("train", "test"):
    assert len(again[split]) == len(examples[split])
    for i, ex in enumerate(examples[split]):
      other = again[split][i]
      for key in ex:
        np.testing.assert_array_equal(np.asarray(ex[key]), np.asarray(other[key]), err_msg=f"{split}[{i}][{key}]")


def test_espeak_phonemes_are_timed():
  u = espeak.synth_utterance("papa mama", "en-us+m1", 150, 50)
  assert u is not None and u.audio.dtype == np.float32
  names = [name for _, name in u.phonemes]
  assert names.count("p") == 2 and names.count("m") == 2
  starts = [s for s, _ in u.phonemes]
  assert starts == sorted(starts) and 0 <= starts[0] < 2000 and starts[-1] <= len(u.audio) + 1600


def test_sonic_pi_flac_samples_read_as_mono_at_the_asked_rate():
  for name in ("drum_cymbal_closed", "misc_burp"):  # 16-bit stereo; 24-bit mono.
    (path,) = noise_sources.sonic_pi_files((name,))
    (sample,) = noise_sources.load_sonic_pi([path], 16000, max_seconds=0.5)
    assert sample.dtype == np.float32 and sample.ndim == 1 and 0 < len(sample) <= 8000
    assert np.abs(sample).max() == pytest.approx(1.0, abs=1e-3)


def _noise_dir(tmp_path):
  """Four noise files: 8 kHz mono WAV, 44.1 kHz stereo FLAC, 22.05 kHz 24-bit WAV, a short 16 kHz float WAV."""
  import soundfile

  rng = np.random.default_rng(0)
  for name, rate, channels, subtype, seconds in (
    ("fan.wav", 8000, 1, "PCM_16", 2.0),
    ("rain.flac", 44100, 2, "PCM_16", 1.5),
    ("road.wav", 22050, 1, "PCM_24", 1.0),
    ("tap.wav", 16000, 1, "FLOAT", 0.2),
  ):
    data = 0.2 * rng.standard_normal((int(rate * seconds), channels))
    soundfile.write(tmp_path / name, np.clip(data, -1, 1), rate, subtype=subtype)
  return tmp_path


def test_noise_dir_files_are_split_resampled_and_mixed_down(tmp_path):
  directory = _noise_dir(tmp_path)
  files = noise_sources.noise_files(str(directory))
  assert [p.split("/")[-1] for p in files["train"]] == ["fan.wav", "rain.flac", "road.wav"]
  assert [p.split("/")[-1] for p in files["test"]] == ["tap.wav"]
  bank = noise_bank.for_split("train", [], av_speech.CONFIGS["tiny"], str(directory))
  assert bank.names == ("fan", "rain", "road")
  for name in bank.names:
    noise = bank(name, np.random.default_rng(1), 40000, "s0")  # longer than every file: looped
    assert noise.shape == (40000,) and noise.dtype == np.float32
    assert noise.std() == pytest.approx(1.0, rel=1e-3)
  assert noise_bank.for_split("test", [], av_speech.CONFIGS["tiny"], str(directory)).names == ("tap",)
  (directory / "test").mkdir()
  (directory / "train").mkdir()
  with pytest.raises(errors.UserError, match="gives no train noise"):
    noise_sources.noise_files(str(directory))  # train/ and test/ exist: they are used, and they are empty


def test_unreadable_noise_file_is_one_line(tmp_path):
  directory = _noise_dir(tmp_path)
  (directory / "broken.wav").write_bytes(b"not audio")
  with pytest.raises(errors.UserError, match="noise file .*broken.wav.* is not a readable audio file"):
    noise_bank.for_split("train", [], av_speech.CONFIGS["tiny"], str(directory))


def test_mix_over_the_whole_signal():
  rng = np.random.default_rng(0)
  speech = np.concatenate([np.zeros(4000), rng.standard_normal(8000), np.zeros(4000)]).astype(np.float32)
  noise = noise_sources.pink_noise(rng, len(speech))
  mixed = noise_sources.mix_at_snr(speech, noise, 3.0, active_only=False)
  snr = 10 * np.log10(np.sum(speech.astype(np.float64) ** 2) / np.sum((mixed - speech).astype(np.float64) ** 2))
  assert snr == pytest.approx(3.0, abs=1e-3)


def test_every_noise_type_is_made():
  sizes = av_speech.CONFIGS["tiny"]
  rng = np.random.default_rng(1)
  talkers = [speech_sources.Utterance(rng.uniform(-0.5, 0.5, 8000).astype(np.float32), f"s{i}", "") for i in range(3)]
  made = {}
  for split, names in (("train", noise_bank.TRAIN_NOISES), ("test", noise_bank.TEST_NOISES)):
    bank = noise_bank.NoiseBank(split, talkers, sizes)
    for name in names:
      noise = bank(name, np.random.default_rng(2), 24000, "s0")
      assert noise.shape == (24000,) and noise.dtype == np.float32 and np.isfinite(noise).all()
      assert noise.std() == pytest.approx(1.0, rel=0.05), name
      made[name] = noise
  names = list(made)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      assert not np.allclose(made[a], made[b]), (a, b)


def _message(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_missing_packages_are_named(monkeypatch, tmp_path):
  monkeypatch.setattr(speech_sources, "POCKETSPHINX_DIR", str(tmp_path / "none"))
  with pytest.raises(errors.MissingDataPackageError) as excinfo:
    av_speech.check_packages()
  assert _message(excinfo) == (
    "AV-speech needs real 16 kHz speech from the Debian package pocketsphinx-testdata: "
    "run 'apt-get install -y pocketsphinx-testdata' (as root)"
  )
  monkeypatch.setattr(noise_sources, "SONIC_PI_DIR", str(tmp_path / "none"))
  monkeypatch.setattr(espeak, "ESPEAK_LIBRARY", "libno-such-espeak.so.1")
  monkeypatch.setattr(espeak.ctypes.util, "find_library", lambda name: None)
  with pytest.raises(errors.MissingDataPackageError) as excinfo:
    av_speech.load(str(tmp_path / "tfds"), config="tiny")
  message = _message(excinfo)
  for package in ("pocketsphinx-testdata", "sonic-pi-samples", "espeak-ng"):
    assert package in message
  assert "apt-get install -y pocketsphinx-testdata espeak-ng sonic-pi-samples" in message
  assert not (tmp_path / "tfds" / "av_speech").exists()


def test_a_tfds_without_the_shuffle_limit_is_one_line(monkeypatch):
  from tensorflow_datasets.core import shuffle

  monkeypatch.delattr(shuffle, "MAX_MEM_BUFFER_SIZE")
  expected = "has no shuffle.MAX_MEM_BUFFER_SIZE.*pip install -e"
  with pytest.raises(errors.UserError, match=expected) as excinfo, av_speech._in_memory_shuffle(1 << 30):
    pass
  assert "\n" not in str(excinfo.value)


def test_the_shuffle_limit_is_raised_only_while_preparing():
  from tensorflow_datasets.core import shuffle

  before = shuffle.MAX_MEM_BUFFER_SIZE
  with av_speech._in_memory_shuffle(before + 1):
    assert shuffle.MAX_MEM_BUFFER_SIZE == before + 1
  assert shuffle.MAX_MEM_BUFFER_SIZE == before


def test_unknown_config_is_refused(tmp_path):
  with pytest.raises(errors.UserError, match="unknown AV-speech config 'huge'"):
    av_speech.load(str(tmp_path), config="huge")
