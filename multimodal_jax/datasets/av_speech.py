"""AV-speech: the embedded audio-visual speech enhancement data for AVDCNN (16 kHz, RENDERED lips).

Each example is a clean utterance, the same utterance mixed with noise at a given SNR, and a lip
stream of one 16x24 RGB mouth image per 20 ms STFT frame (50 fps):

* `clean`, `noisy`: float32 `[N]` at 16 kHz in [-1, 1] (stored as 16-bit PCM); N varies.
* `lips`: uint8 `[T, 16, 24, 3]`, T = `multimodal_jax.audio.num_frames(N, 512, 320)`. The lips are
  RENDERED, not filmed (no lip video installs with any package): see `lips.py`.
* `snr`: float32 `[]` dB, of the whole noisy signal against the whole clean one.
* `noise`, `speaker`, `text`: str (text is '' when the transcript is unknown).

Clean speech: real recordings (`speech_sources.py`: Asterisk prompts of 4 speakers, band-limited
to 4 kHz; pocketsphinx test utterances) and espeak-ng sentences in 5 languages with 13 voice
variants (`espeak.py`); each utterance gets 0.1-0.4 s of silence before and after. Test speakers are
never heard in training (espeak variants TEST_VARIANTS in every language and the Asterisk speaker
Carlo) and test noise types are never heard in training (`noise_bank.py`: 18 TRAIN_NOISES, 4
TEST_NOISES, synthetic and sonic-pi / music-on-hold samples), as in the paper.

Train: `train_mixtures` mixtures per utterance (2 in the default config), each with a random noise
type and SNR (TRAIN_SNRS). Test: every test utterance with every test noise at every TEST_SNRS
(same noise excerpt and lip video across SNRs). Version 1.1.0 changed only the training mixtures
(6 -> 18 noise types, 1 -> 2 mixtures per utterance); the test split is byte-identical to 1.0.0's.

TFDS writes array_record files without TensorFlow; `load()` decodes the stored 16-bit audio to
float32 and the strings to str on access. Preparation is deterministic: the same examples, byte for
byte, in the same order (the files' bytes may still differ, as protobuf serializes each example's
feature map in an order of its own per process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from multimodal_jax import errors
from multimodal_jax.audio import SAMPLE_RATE
from multimodal_jax.data import prepared
from multimodal_jax.datasets import espeak, noise_bank, noise_sources, speech_sources
from multimodal_jax.datasets import lips as lips_lib

SEED = 20240705
TRAIN_SNRS = tuple(float(s) for s in range(-5, 11))  # dB, drawn uniformly.
TEST_SNRS = (-5.0, 0.0, 5.0, 10.0)
ESPEAK_LANGUAGES = tuple(espeak.ESPEAK_LANGUAGES)
TRAIN_VARIANTS = ("m1", "m2", "m4", "m6", "m7", "f1", "f3", "f5", "klatt", "croak")
TEST_VARIANTS = ("m3", "f2", "klatt4")
TEST_REAL_SPEAKERS = ("asterisk/Carlo",)
PAD_SECONDS = (0.1, 0.4)  # Silence before and after each utterance.
MAX_PEAK = 0.99


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How much of each source a config uses.

  Attributes:
    train_synth, train_real: espeak-ng and recorded training utterances.
    test_synth, test_real: test utterances (each mixed with every test noise at every test SNR).
    asterisk_files: per Asterisk voice folder, read only this many prompts (None: all).
    sonic_pi_files: per noise type, use only this many sonic-pi samples (None: all).
    music_tracks: how many music-on-hold tracks the 'music' noise uses.
    train_mixtures: noisy versions of each training utterance (each its own noise type and SNR).
  """

  train_synth: int
  train_real: int
  test_synth: int
  test_real: int
  asterisk_files: int | None = None
  sonic_pi_files: int | None = None
  music_tracks: int = len(noise_sources.MUSIC_TRACKS)
  train_mixtures: int = 1


CONFIGS = {
  "default": Sizes(train_synth=1200, train_real=1200, test_synth=10, test_real=10, train_mixtures=2),
  "tiny": Sizes(
    train_synth=12, train_real=12, test_synth=1, test_real=1, asterisk_files=12, sonic_pi_files=2, music_tracks=1
  ),
}


def _rng(seed: int, *stage: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, *stage]))


# ---------------------------------------------------------------- packages


def missing_speech_packages() -> list[tuple[str, str]]:
  """The missing Debian packages of the clean speech (recordings, transcripts, espeak-ng)."""
  return speech_sources.missing_packages() + espeak.missing_packages()


def missing_packages() -> list[tuple[str, str]]:
  """The missing Debian packages, speech then noise, as (package, what it gives)."""
  return missing_speech_packages() + noise_bank.missing_packages()


def check_packages(noise_dir: str = "") -> None:
  """Raises MissingDataPackageError naming every missing package and the install command (one line).
  With a `noise_dir` the noise packages are not needed, only the speech ones."""
  missing = missing_speech_packages() if noise_dir else missing_packages()
  if not missing:
    return
  packages = " ".join(dict.fromkeys(p for p, _ in missing))
  if len(missing) == 1:
    needs = f"{missing[0][1]} from the Debian package {missing[0][0]}"
  else:
    needs = "Debian packages that are not installed: " + ", ".join(f"{p} ({what})" for p, what in missing)
  raise errors.MissingDataPackageError(f"AV-speech needs {needs}: run 'apt-get install -y {packages}' (as root)")


# ---------------------------------------------------------------- clean speech


def speech_pools(sizes: Sizes, seed: int) -> dict[str, list[speech_sources.Utterance]]:
  """The clean utterances of each split; train and test speakers are disjoint."""
  rng = _rng(seed, 0)
  real = speech_sources.load_asterisk(max_files=sizes.asterisk_files)
  train_real = [u for u in real if u.speaker not in TEST_REAL_SPEAKERS]
  if sizes.asterisk_files is None:
    train_real += speech_sources.load_pocketsphinx()
  test_real = [u for u in real if u.speaker in TEST_REAL_SPEAKERS]
  pick = lambda pool, k: [pool[i] for i in np.sort(rng.choice(len(pool), min(k, len(pool)), replace=False))]
  return {
    "train": espeak.synth_espeak(ESPEAK_LANGUAGES, TRAIN_VARIANTS, sizes.train_synth, seed + 1)
    + pick(train_real, sizes.train_real),
    "test": espeak.synth_espeak(ESPEAK_LANGUAGES, TEST_VARIANTS, sizes.test_synth, seed + 2)
    + pick(test_real, sizes.test_real),
  }


def pad_utterance(
  utterance: speech_sources.Utterance, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[tuple[int, str], ...] | None]:
  """The utterance with PAD_SECONDS of silence at both ends, and its phonemes moved to match."""
  before, after = (int(rng.uniform(*PAD_SECONDS) * SAMPLE_RATE) for _ in range(2))
  audio = np.concatenate([np.zeros(before, np.float32), utterance.audio, np.zeros(after, np.float32)])
  if utterance.phonemes is None:
    return audio, None
  return audio, tuple((s + before, name) for s, name in utterance.phonemes)


# ---------------------------------------------------------------- examples


def mix(clean: np.ndarray, noise: np.ndarray, snr: float) -> tuple[np.ndarray, np.ndarray]:
  """(clean, noisy) at `snr` dB over the whole signal, both scaled by one factor so that neither
  peaks above MAX_PEAK, then rounded to 16-bit PCM, int16 `[n]` each."""
  noisy = noise_sources.mix_at_snr(clean, noise, snr, active_only=False)
  scale = min(1.0, MAX_PEAK / max(np.abs(noisy).max(), np.abs(clean).max(), 1e-9))
  return tuple(np.rint(x * scale * 32767).astype(np.int16) for x in (clean, noisy))


def make_example(clean, lips, noise, noise_name: str, snr: float, utterance: speech_sources.Utterance) -> dict:
  """An example as stored: clean float `[n]` mixed with noise `[n]` at snr dB, lips uint8 `[T, 16, 24, 3]`."""
  clean16, noisy16 = mix(clean, noise, snr)
  return {
    "clean": clean16,
    "noisy": noisy16,
    "lips": lips,
    "snr": np.float32(snr),
    "noise": noise_name,
    "speaker": utterance.speaker,
    "text": utterance.text,
  }


def generate(split: str, pool: list[speech_sources.Utterance], sizes: Sizes, seed: int = SEED, noise_dir: str = ""):
  """Yields (key, example) of one split from its clean utterances, examples as stored (audio int16)."""
  bank = noise_bank.for_split(split, pool, sizes, noise_dir)
  for i, utterance in enumerate(pool):
    rng = _rng(seed, 1 if split == "train" else 2, i)
    clean, phonemes = pad_utterance(utterance, rng)
    lips = lips_lib.render_utterance(clean, utterance.speaker, phonemes, seed=zlib.crc32(f"{split}{i}".encode()))
    if split == "train":
      for m in range(sizes.train_mixtures):
        mixture_rng = rng if m == 0 else _rng(seed, 4, i, m)
        name = bank.names[int(mixture_rng.integers(len(bank.names)))]
        snr = float(mixture_rng.choice(TRAIN_SNRS))
        noise = bank(name, mixture_rng, len(clean), utterance.speaker)
        yield i * sizes.train_mixtures + m, make_example(clean, lips, noise, name, snr, utterance)
      continue
    for j, name in enumerate(bank.names):
      noise = bank(name, _rng(seed, 3, i, j), len(clean), utterance.speaker)
      for k, snr in enumerate(TEST_SNRS):
        yield (i * len(bank.names) + j) * len(TEST_SNRS) + k, make_example(clean, lips, noise, name, snr, utterance)


# ---------------------------------------------------------------- TFDS


def _int16(shape):
  return tfds.features.Tensor(shape=shape, dtype=np.int16, encoding=tfds.features.Encoding.BYTES)


def features() -> tfds.features.FeaturesDict:
  """The stored features (audio as 16-bit PCM; `decode` turns an example into floats and str)."""
  return tfds.features.FeaturesDict(
    {
      "clean": _int16((None,)),
      "noisy": _int16((None,)),
      "lips": tfds.features.Tensor(
        shape=(None, lips_lib.HEIGHT, lips_lib.WIDTH, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      ),
      "snr": tfds.features.Tensor(shape=(), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
      "noise": tfds.features.Text(),
      "speaker": tfds.features.Text(),
      "text": tfds.features.Text(),
    }
  )


@dataclasses.dataclass(eq=False)
class AvSpeechConfig(tfds.core.BuilderConfig):
  """A config: `sizes` names its CONFIGS entry ("" : the config's name); `noise_dir` replaces the
  packages' noises by the audio files there."""

  sizes: str = ""
  noise_dir: str = ""


def noise_config(sizes: str, noise_dir: str) -> AvSpeechConfig:
  """The config of `sizes` with the noise files of `noise_dir`, named after a hash of the directory
  and its files (names and sizes), so that other noise is stored apart."""
  noise_dir = os.path.realpath(noise_dir)
  splits = noise_sources.noise_files(noise_dir)
  files = [(os.path.relpath(p, noise_dir), os.path.getsize(p)) for s in ("train", "test") for p in splits[s]]
  key = repr((sizes, noise_dir, files))
  return AvSpeechConfig(
    name=f"{sizes}_noise{zlib.crc32(key.encode()):08x}", description=key, sizes=sizes, noise_dir=noise_dir
  )


class AvSpeech(tfds.core.GeneratorBasedBuilder):
  """AV-speech: clean and noisy 16 kHz speech with a rendered 50 fps lip stream."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Initial release.",
    "1.1.0": "18 training noise types (was 6), 2 mixtures per training utterance; test split unchanged.",
  }
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
    AvSpeechConfig(name="default", description="4,800 train (2,400 utterances) and 320 test examples."),
    AvSpeechConfig(name="tiny", description="24 train and 32 test examples, for tests."),
  ]
  code_path = None  # We download nothing (see av_digits.AvDigits).

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Clean and noisy speech (16 kHz) with a RENDERED mouth image per 20 ms frame.",
      features=features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    noise_dir = getattr(config, "noise_dir", "")
    check_packages(noise_dir)
    sizes = CONFIGS[getattr(config, "sizes", "") or config.name]
    pools = speech_pools(sizes, SEED)
    return {split: generate(split, pools[split], sizes, noise_dir=noise_dir) for split in ("train", "test")}

  def _generate_examples(self, examples):
    yield from examples


def decode(example: dict) -> dict:
  """A stored example with float32 audio in [-1, 1] and str strings."""
  out = dict(example)
  for key in ("clean", "noisy"):
    out[key] = np.asarray(example[key], np.float32) / 32767.0
  for key in ("noise", "speaker", "text"):
    value = example[key]
    out[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
  out["snr"] = np.asarray(example["snr"], np.float32)
  return out


class DecodedSource:
  """Random access to a split, each example passed through `decode`."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return decode(self._source[index])

  def __repr__(self) -> str:
    return f"DecodedSource({self._source!r})"


@contextlib.contextmanager
def _in_memory_shuffle(limit: int):
  """Raises TFDS's in-memory shuffle buffer to `limit` bytes while preparing: past its 1 GB default
  TFDS spills to temporary files through TensorFlow's file API, and TensorFlow is not a dependency
  (the default train split is about 1.3 GB)."""
  from tensorflow_datasets.core import shuffle

  saved = getattr(shuffle, "MAX_MEM_BUFFER_SIZE", None)  # private: pinned by pyproject's tensorflow-datasets range
  if saved is None:
    raise errors.UserError(
      f"tensorflow-datasets {tfds.__version__} has no shuffle.MAX_MEM_BUFFER_SIZE, which AV-speech raises to "
      "prepare its train split in memory: install the version pyproject.toml pins (pip install -e .)"
    )
  shuffle.MAX_MEM_BUFFER_SIZE = max(saved, limit)
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = saved


def load(
  data_dir: str | None = None, config: str = "default", noise_dir: str | None = None
) -> dict[str, DecodedSource]:
  """{'train': source, 'test': source}, random access, prepared on first use.

  Args:
    data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    config: 'default' (4,800 train mixtures of 2,400 utterances and 320 test examples) or
      'tiny' (24 and 32, a few seconds; for tests).
    noise_dir: a directory of audio files (any rate, mono or stereo) that replace the noises of the
      Debian packages (`noise_sources.noise_files` splits them into train and test noises).

  Returns:
    Sources whose elements are dicts: 'clean', 'noisy' float32 `[N]`, 'lips' uint8
    `[T, 16, 24, 3]` (T = audio.num_frames(N, 512, 320)), 'snr' float32 `[]`, 'noise', 'speaker',
    'text' str.

  Raises:
    UserError: unknown config.
    MissingDataPackageError: a Debian package with the raw data is not installed.
  """
  if config not in CONFIGS:
    raise errors.UserError(f"unknown AV-speech config {config!r}: use one of {', '.join(CONFIGS)}")
  builder_config = noise_config(config, noise_dir) if noise_dir else config
  builder = AvSpeech(config=builder_config, data_dir=data_dir, file_format="array_record")
  if not builder.data_path.exists():
    check_packages(noise_dir or "")
    with _in_memory_shuffle(4 << 30):
      builder.download_and_prepare()
  return {split: DecodedSource(source) for split, source in prepared.data_sources(builder).items()}
