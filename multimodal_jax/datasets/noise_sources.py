"""Noise for AV-digits and AVDCNN: real music and samples, the user's noise files, synthetic white,
pink, babble, street noise.

Real music: the 8 kHz on-hold music tracks of the Debian package
`asterisk-moh-opsound-wav` (`/usr/share/asterisk/moh/*.wav`); real samples
(ambient textures, drums, tabla, electronic sounds): the 44.1 kHz FLAC files of
the Debian package `sonic-pi-samples`. The user's noise (`noise_files`, `FileNoises`): any
audio files in a directory, at any rate, mono or stereo. Files are read with soundfile
(`audio.read_audio`). The AV-digits helpers work at 8 kHz; white, pink, babble and the AVDCNN
helpers at any rate.
"""

import os

import numpy as np
from scipy import signal

from multimodal_jax import audio as audio_lib
from multimodal_jax.datasets import digit_sources
from multimodal_jax.errors import UserError

ASTERISK_MOH_DIR = "/usr/share/asterisk/moh"
MUSIC_TRACKS = (
  "macroform-cold_day",
  "macroform-robot_dity",
  "macroform-the_simplicity",
  "manolo_camp-morning_coffee",
  "reno_project-system",
)


def music_files() -> tuple[str, ...]:
  """Paths of the music tracks (they may not exist)."""
  return tuple(os.path.join(ASTERISK_MOH_DIR, f"{t}.wav") for t in MUSIC_TRACKS)


def load_music(tracks: tuple[str, ...]) -> np.ndarray:
  """Concatenates the named tracks (names from MUSIC_TRACKS).

  Returns:
    float32 `[n]` at 8 kHz, zero mean, unit RMS.
  """
  parts = []
  for t in tracks:
    signal, rate = audio_lib.read_audio(os.path.join(ASTERISK_MOH_DIR, f"{t}.wav"))
    parts.append(audio_lib.resample(signal, rate, digit_sources.SAMPLE_RATE))
  x = np.concatenate(parts)
  x = x - x.mean()
  return (x / (x.std() + 1e-9)).astype(np.float32)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """Gaussian white noise, float32 `[n]`, unit RMS."""
  return rng.standard_normal(n).astype(np.float32)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """1/f (pink) noise by spectral shaping, float32 `[n]`, unit RMS."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  f = np.arange(len(spectrum), dtype=np.float64)
  f[0] = 1.0
  x = np.fft.irfft(spectrum / np.sqrt(f), n)
  x -= x.mean()
  return (x / (x.std() + 1e-9)).astype(np.float32)


def babble(rng: np.random.Generator, talkers: list[np.ndarray], n: int) -> np.ndarray:
  """Sum of several speech clips at random offsets (crowd-like noise).

  Args:
    rng: random generator.
    talkers: float `[m_i]` clips, each placed (cyclically) at a random offset.
    n: output length in samples.

  Returns:
    float32 `[n]`, unit RMS.
  """
  out = np.zeros(n, np.float64)
  for clip in talkers:
    clip = rng.uniform(0.5, 1.0) * clip[:n]
    start = int(rng.integers(0, n))
    head = min(len(clip), n - start)
    out[start : start + head] += clip[:head]
    out[: len(clip) - head] += clip[head:]
  return (out / (out.std() + 1e-9)).astype(np.float32)


def random_segment(rng: np.random.Generator, source: np.ndarray, n: int) -> np.ndarray:
  """A random length-n window of `source` (float `[m]`, m >= n), unit RMS."""
  start = int(rng.integers(0, len(source) - n + 1))
  x = source[start : start + n]
  return (x / (x.std() + 1e-9)).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float, active_only: bool = True) -> np.ndarray:
  """Adds `noise` to `speech` (both float `[n]`) at the given SNR.

  Speech power is measured over the non-zero samples, so the zero padding
  around a clip does not count; with active_only=False over all samples (the
  SNR of the whole signal).

  Returns:
    float32 `[n]`.
  """
  active = speech != 0 if active_only else np.ones(speech.shape, bool)
  p_speech = np.mean(speech[active] ** 2) if active.any() else 1.0
  p_noise = np.mean(noise**2) + 1e-12
  gain = np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10)))
  return (speech + gain * noise).astype(np.float32)


# ---------------------------------------------------------------- noise for AVDCNN (any sample rate)

SONIC_PI_DIR = "/usr/share/sonic-pi/samples"


def sonic_pi_files(prefixes: tuple[str, ...]) -> list[str]:
  """Sorted paths of the sonic-pi samples whose names start with one of `prefixes`."""
  if not os.path.isdir(SONIC_PI_DIR):
    return []
  names = sorted(f for f in os.listdir(SONIC_PI_DIR) if f.endswith(".flac") and f.startswith(prefixes))
  return [os.path.join(SONIC_PI_DIR, f) for f in names]


def load_sonic_pi(paths: list[str], rate: int, max_seconds: float = 4.0) -> list[np.ndarray]:
  """The samples (at most max_seconds each) as mono float32 `[n]` at `rate`, peak 1."""
  out = []
  for path in paths:
    audio, native = audio_lib.read_audio(path, max_seconds=max_seconds)
    audio = audio_lib.resample(audio, native, rate)
    out.append((audio / (np.abs(audio).max() + 1e-9)).astype(np.float32))
  return out


# ---------------------------------------------------------------- the user's noise files

NOISE_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au", ".caf", ".w64", ".rf64", ".mp3")
TEST_NOISE_FRACTION = 0.2  # Share of a noise directory's files held out for the test split (at least one).


def noise_files(noise_dir: str) -> dict[str, list[str]]:
  """`{"train": paths, "test": paths}` of the audio files of `noise_dir`: those of its `train/` and
  `test/` sub-directories when it has both, else its own files sorted by name, the last
  TEST_NOISE_FRACTION (at least one) for test, so that test noises are never heard in training.
  UserError (one line) when it has too few files."""

  def listing(folder: str) -> list[str]:
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(NOISE_SUFFIXES))
    return [os.path.join(folder, f) for f in names if os.path.isfile(os.path.join(folder, f))]

  if not os.path.isdir(noise_dir):
    raise UserError(f"noise directory {noise_dir!r} does not exist: set --config.noise_dir to a folder of audio files")
  if all(os.path.isdir(os.path.join(noise_dir, s)) for s in ("train", "test")):
    splits = {s: listing(os.path.join(noise_dir, s)) for s in ("train", "test")}
  else:
    paths = listing(noise_dir)
    k = max(1, round(TEST_NOISE_FRACTION * len(paths)))
    splits = {"train": paths[:-k], "test": paths[-k:]}
  for split, paths in splits.items():
    if not paths:
      raise UserError(
        f"noise directory {noise_dir!r} gives no {split} noise: put at least two audio files (WAV, FLAC, OGG) in it, "
        "or train/ and test/ folders of them"
      )
  return splits


class FileNoises:
  """Noise from audio files: each file is a noise type named after its file (stem), read once,
  mixed down to mono, resampled to `rate` and scaled to unit RMS; a call returns a random stretch
  of it (looped when the file is shorter)."""

  def __init__(self, paths: list[str], rate: int):
    self.names: tuple[str, ...] = tuple(os.path.splitext(os.path.basename(p))[0] for p in paths)
    if len(set(self.names)) != len(self.names):
      raise UserError(f"noise files {paths} share a name: give each noise file its own name")
    self._audio = {}
    for name, path in zip(self.names, paths, strict=True):
      signal, native = audio_lib.read_audio(path, what="noise file")
      signal = audio_lib.resample(signal, native, rate)
      if not len(signal) or not np.any(signal):
        raise UserError(f"noise file {path!r} is empty or silent: remove it or give a file with sound")
      self._audio[name] = ((signal - signal.mean()) / (signal.std() + 1e-9)).astype(np.float32)

  def __call__(self, name: str, rng: np.random.Generator, n: int, speaker: str = "") -> np.ndarray:
    """`n` samples of noise `name`, float32 `[n]`, from a random start (`speaker` is not used)."""
    del speaker
    source = self._audio[name]
    looped = np.tile(source, n // len(source) + 2) if len(source) < n else source
    return random_segment(rng, looped, n)


def sequence(
  rng: np.random.Generator, hits: list[np.ndarray], n: int, rate: int, bpm: tuple[float, float]
) -> np.ndarray:
  """One-shot samples played on a beat grid (random tempo, skipped beats, gains), float32 `[n]`,
  unit RMS: drum patterns and the like."""
  out = np.zeros(n, np.float64)
  step = 60.0 / rng.uniform(*bpm) / 2 * rate  # Eighth notes.
  position = -rng.uniform(0, step)
  while position < n:
    if rng.random() < 0.7:
      hit = hits[int(rng.integers(len(hits)))]
      start = max(0, int(position))
      head = hit[max(0, -int(position)) :][: n - start]
      out[start : start + len(head)] += rng.uniform(0.4, 1.0) * head
    position += step
  out += 1e-4 * rng.standard_normal(n)  # Never all zero.
  return (out / (out.std() + 1e-9)).astype(np.float32)


def texture(rng: np.random.Generator, clips: list[np.ndarray], n: int, layers: int = 2) -> np.ndarray:
  """`layers` overlaid random stretches of long clips (looped), float32 `[n]`, unit RMS: ambient beds."""
  out = np.zeros(n, np.float64)
  for _ in range(layers):
    clip = clips[int(rng.integers(len(clips)))]
    looped = np.tile(clip, n // len(clip) + 2)
    start = int(rng.integers(0, len(clip)))
    out += rng.uniform(0.5, 1.0) * looped[start : start + n]
  return (out / (out.std() + 1e-9)).astype(np.float32)


def _lowpass(rng_noise: np.ndarray, cutoff: float, rate: int) -> np.ndarray:
  b, a = signal.butter(2, cutoff / (rate / 2))
  return signal.lfilter(b, a, rng_noise)


def street(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
  """Synthetic street noise, float32 `[n]`, unit RMS: low traffic rumble, passing cars (band noise
  with slow swells) and now and then a two-tone car horn."""
  t = np.arange(n) / rate
  rumble = _lowpass(rng.standard_normal(n), 150.0, rate)
  rumble /= rumble.std() + 1e-9
  cars = _lowpass(rng.standard_normal(n), 1200.0, rate)
  cars /= cars.std() + 1e-9
  swell = np.zeros(n)
  for _ in range(int(rng.integers(1, 4))):  # Cars passing: Gaussian swells of 1-2 s.
    centre, width = rng.uniform(-0.5, n / rate + 0.5), rng.uniform(0.5, 1.0)
    swell += np.exp(-0.5 * ((t - centre) / width) ** 2)
  out = rumble + cars * (0.3 + 1.5 * swell)
  if rng.random() < 0.5:
    start, length = rng.uniform(0, n / rate), rng.uniform(0.2, 0.6)
    on = (t >= start) & (t < start + length)
    f0 = rng.uniform(350.0, 500.0)
    horn = sum(np.sign(np.sin(2 * np.pi * f * t)) / (h + 1) for h, f in enumerate((f0, f0 * 1.26)))
    out += 2.0 * on * horn
  return (out / (out.std() + 1e-9)).astype(np.float32)


def clinks(rng: np.random.Generator, n: int, rate: int, per_second: float = 1.5) -> np.ndarray:
  """Cutlery and glass clinks (short decaying high partials at random times), float32 `[n]`."""
  out = np.zeros(n, np.float64)
  t = np.arange(int(0.25 * rate)) / rate
  for _ in range(rng.poisson(per_second * n / rate)):
    partials = rng.uniform(2000.0, min(7000.0, 0.45 * rate), 3)
    sound = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) for f in partials) * np.exp(-t * rng.uniform(20, 60))
    start = int(rng.integers(0, n))
    head = sound[: n - start]
    out[start : start + len(head)] += rng.uniform(0.3, 1.0) * head
  return out.astype(np.float32)


def brown_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """1/f² (brown) noise by spectral shaping, float32 `[n]`, unit RMS: rumble."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  f = np.arange(len(spectrum), dtype=np.float64)
  f[0] = 1.0
  x = np.fft.irfft(spectrum / f, n)
  x -= x.mean()
  return (x / (x.std() + 1e-9)).astype(np.float32)


def coloured_noise(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
  """Stationary noise with a random spectrum, float32 `[n]`, unit RMS: a random tilt (-9 to +3 dB
  per octave) times 1-3 random resonances (200 Hz to 0.45 rate, Q 1-8): fans, engines, hiss."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  f = np.maximum(np.fft.rfftfreq(n, 1.0 / rate), 20.0)
  gain_db = rng.uniform(-9.0, 3.0) * np.log2(f / 1000.0)
  for _ in range(int(rng.integers(1, 4))):
    centre = np.exp(rng.uniform(np.log(200.0), np.log(0.45 * rate)))
    q = rng.uniform(1.0, 8.0)
    gain_db += rng.uniform(6.0, 20.0) / (1.0 + (q * (f / centre - centre / f)) ** 2)
  x = np.fft.irfft(spectrum * 10 ** (gain_db / 20), n)
  x -= x.mean()
  return (x / (x.std() + 1e-9)).astype(np.float32)


def modulated(rng: np.random.Generator, noise: np.ndarray, rate: int) -> np.ndarray:
  """`noise` under a random slow envelope (0.3-6 Hz, 6-30 dB deep), float32, unit RMS: gusts, machines
  cycling, traffic swells."""
  n = len(noise)
  t = np.arange(n) / rate
  depth = 1.0 - 10 ** (-rng.uniform(6.0, 30.0) / 20)
  freq = np.exp(rng.uniform(np.log(0.3), np.log(6.0)))
  wobble = np.cumsum(rng.standard_normal(n)) / np.sqrt(rate) * 0.5  # Slow phase drift: no fixed period.
  envelope = 1.0 - depth * 0.5 * (1.0 + np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.3) + wobble))
  out = noise * envelope
  return (out / (out.std() + 1e-9)).astype(np.float32)


def hum(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
  """Machine hum, float32 `[n]`, unit RMS: a 40-300 Hz fundamental with random harmonic amplitudes
  up to 4 kHz, slight frequency drift, plus a little coloured noise."""
  f0 = np.exp(rng.uniform(np.log(40.0), np.log(300.0)))
  drift = 1.0 + 0.01 * np.cumsum(rng.standard_normal(n)) / np.sqrt(n)
  phase = 2 * np.pi * np.cumsum(f0 * drift) / rate
  harmonics = int(min(40, 4000.0 // f0))
  amplitudes = rng.uniform(0.0, 1.0, harmonics) / np.arange(1, harmonics + 1) ** rng.uniform(0.3, 1.5)
  out = sum(a * np.sin(k * phase + rng.uniform(0, 6.3)) for k, a in enumerate(amplitudes, 1))
  out = out / (np.std(out) + 1e-9) + 0.2 * coloured_noise(rng, n, rate)
  return (out / (out.std() + 1e-9)).astype(np.float32)


def siren(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
  """An alarm or siren, float32 `[n]`, unit RMS: a tone with 3 harmonics swept between two pitches
  (500-1800 Hz) by a sine or a square wave at 0.2-3 Hz."""
  t = np.arange(n) / rate
  low = rng.uniform(500.0, 1000.0)
  high = low * rng.uniform(1.2, 1.8)
  sweep = np.sin(2 * np.pi * rng.uniform(0.2, 3.0) * t + rng.uniform(0, 6.3))
  if rng.random() < 0.5:
    sweep = np.sign(sweep)
  phase = 2 * np.pi * np.cumsum(low + (high - low) * 0.5 * (1.0 + sweep)) / rate
  out = sum(np.sin(k * phase) / k for k in (1, 2, 3))
  return (out / (out.std() + 1e-9)).astype(np.float32)
