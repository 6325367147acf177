"""Audio front end in jnp: STFT / ISTFT, log-power features, context frames, resynthesis.

Conventions (those of `scipy.signal.stft` / `istft` with `boundary="zeros"`, `padded=True`, up to
scipy's 1/sum(window) scaling): the signal is zero-padded by n_fft // 2 on both sides, then at the
end up to a whole number of hops; frame t covers samples [t * hop, t * hop + n_fft) of the padded
signal. ISTFT is a weighted overlap-add divided by the overlap-added squared window, which inverts
the STFT exactly whenever the squared windows overlap everywhere (true for the AVDCNN setting:
Hann 512 / hop 320 at 16 kHz). Nothing here imports the rest of the package.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from scipy import signal as sps


def hann_window(n: int) -> jnp.ndarray:
  """The periodic Hann window `[n]` (scipy's `get_window("hann", n)`)."""
  return 0.5 - 0.5 * jnp.cos(2.0 * jnp.pi * jnp.arange(n) / n)


def _padding(length: int, n_fft: int, hop: int) -> tuple[int, int]:
  """(left, right) zero padding of a signal of `length` samples: centre, then whole hops."""
  left = n_fft // 2
  padded = length + 2 * left
  extra = (-(padded - n_fft)) % hop
  return left, left + extra


def num_frames(length: int, n_fft: int, hop: int) -> int:
  left, right = _padding(length, n_fft, hop)
  return (length + left + right - n_fft) // hop + 1


def stft(signal: jnp.ndarray, n_fft: int = 512, hop: int = 320, window: jnp.ndarray | None = None) -> jnp.ndarray:
  """Complex spectrogram `[..., frames, n_fft // 2 + 1]` of a signal `[..., samples]`."""
  window = hann_window(n_fft) if window is None else window
  length = signal.shape[-1]
  left, right = _padding(length, n_fft, hop)
  padded = jnp.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(left, right)])
  frames = num_frames(length, n_fft, hop)
  index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  return jnp.fft.rfft(padded[..., index] * window, n=n_fft, axis=-1)


def istft(
  spectrum: jnp.ndarray, length: int, n_fft: int = 512, hop: int = 320, window: jnp.ndarray | None = None
) -> jnp.ndarray:
  """The signal `[..., length]` whose STFT (same n_fft, hop, window) is `spectrum [..., frames, bins]`."""
  window = hann_window(n_fft) if window is None else window
  frames = spectrum.shape[-2]
  if frames != num_frames(length, n_fft, hop):
    raise ValueError(
      f"{frames} frames do not match a signal of {length} samples (expected {num_frames(length, n_fft, hop)})"
    )
  pieces = jnp.fft.irfft(spectrum, n=n_fft, axis=-1) * window  # [..., frames, n_fft]
  total = (frames - 1) * hop + n_fft
  index = (np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]).reshape(-1)
  summed = (
    jnp.zeros(spectrum.shape[:-2] + (total,), pieces.dtype)
    .at[..., index]
    .add(pieces.reshape(spectrum.shape[:-2] + (-1,)))
  )
  norm = jnp.zeros((total,), window.dtype).at[index].add(jnp.tile(window**2, frames))
  signal = summed / jnp.where(norm > 1e-10, norm, 1.0)
  left = n_fft // 2
  return signal[..., left : left + length]


def log_power(spectrum: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
  """log(|S|² + eps), float32, same shape as `spectrum`."""
  return jnp.log(jnp.abs(spectrum).astype(jnp.float32) ** 2 + eps)


def normalize_utterance(
  features: jnp.ndarray, eps: float = 1e-5, frames: jnp.ndarray | int | None = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Per-utterance mean/std normalisation over frames of `[..., frames, bins]` (per bin).

  With `frames` (an int or a traced scalar), only the first `frames` frames count (the rest are
  padding, e.g. of a signal zero-padded to a fixed length so that a jitted shape repeats); the
  padding is normalised with the same statistics.

  Returns `(normalised, mean, std)`, mean and std `[..., 1, bins]`, so that an enhanced output can
  be mapped back with `x * std + mean`.
  """
  count = features.shape[-2] if frames is None else frames
  valid = (jnp.arange(features.shape[-2]) < count)[:, None]
  mean = jnp.sum(features * valid, axis=-2, keepdims=True) / count
  std = jnp.sqrt(jnp.sum(((features - mean) * valid) ** 2, axis=-2, keepdims=True) / count) + eps
  return (features - mean) / std, mean, std


def context_index(total: int, radius: int = 2, frames: jnp.ndarray | int | None = None) -> jnp.ndarray:
  """`[total, 2r + 1]` indices of each frame's ±radius neighbours, clamped to the first `frames`
  frames (default all `total`): frames past either end repeat the edge frame."""
  last = (total if frames is None else frames) - 1
  offsets = jnp.arange(-radius, radius + 1)
  return jnp.clip(jnp.arange(total)[:, None] + offsets[None, :], 0, last)


def context_frames(features: jnp.ndarray, radius: int = 2) -> jnp.ndarray:
  """Each frame with its ±radius neighbours: `[..., frames, bins]` -> `[..., frames, bins, 2r + 1]`.

  Frames past either end repeat the edge frame.
  """
  return jnp.moveaxis(features[..., context_index(features.shape[-2], radius), :], -2, -1)


def resynthesize(
  log_power_spectrum: jnp.ndarray,
  phase_source: jnp.ndarray,
  length: int,
  n_fft: int = 512,
  hop: int = 320,
) -> jnp.ndarray:
  """A waveform `[..., length]` from a (enhanced) log-power spectrum and the phase of another
  complex spectrum (the noisy input's, as AVDCNN does), by overlap-add."""
  magnitude = jnp.sqrt(jnp.exp(log_power_spectrum))
  return istft(magnitude * jnp.exp(1j * jnp.angle(phase_source)), length, n_fft, hop)


def resample(signal: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
  """Polyphase resampling (zero phase, no delay) of float `[n]` from `rate` to `target_rate` Hz, float32."""
  if rate == target_rate:
    return np.asarray(signal, np.float32)
  g = math.gcd(rate, target_rate)
  return sps.resample_poly(signal, target_rate // g, rate // g).astype(np.float32)
