"""Noise for AV-digits: real music plus synthetic white, pink and babble noise.

Real music: the 8 kHz on-hold music tracks of the Debian package
`asterisk-moh-opsound-wav` (`/usr/share/asterisk/moh/*.wav`).
All signals are float32 mono at 8 kHz.
"""

import os

import numpy as np

from multimodal_jax.data import digit_sources

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
  parts = [digit_sources.read_wav(os.path.join(ASTERISK_MOH_DIR, f"{t}.wav")) for t in tracks]
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


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
  """Adds `noise` to `speech` (both float `[n]`) at the given SNR.

  Speech power is measured over the non-zero samples, so the zero padding
  around a clip does not count.

  Returns:
    float32 `[n]`.
  """
  active = speech != 0
  p_speech = np.mean(speech[active] ** 2) if active.any() else 1.0
  p_noise = np.mean(noise**2) + 1e-12
  gain = np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10)))
  return (speech + gain * noise).astype(np.float32)
