"""Audio front end in jnp (STFT / ISTFT, log-power features, context frames, resynthesis) and audio
and mouth-frame file I/O (read and written with soundfile: WAV of any sub-format, FLAC, OGG, ...).

`SAMPLE_RATE`, `N_FFT` and `HOP` are the speech-enhancement front end's settings (16 kHz, a 32 ms
Hann window, a 20 ms hop: 50 frames per second), shared by the AV-speech data, its rendered lips
and AVDCNN; this is their one definition.

Conventions (those of `scipy.signal.stft` / `istft` with `boundary="zeros"`, `padded=True`, up to
scipy's 1/sum(window) scaling): the signal is zero-padded by n_fft // 2 on both sides, then at the
end up to a whole number of hops; frame t covers samples [t * hop, t * hop + n_fft) of the padded
signal. ISTFT is a weighted overlap-add divided by the overlap-added squared window, which inverts
the STFT exactly whenever the squared windows overlap everywhere (true for the AVDCNN setting:
Hann 512 / hop 320 at 16 kHz). Only `errors` is imported from the rest of the package.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
from scipy import signal as sps

from multimodal_jax.errors import UserError

SAMPLE_RATE = 16000
N_FFT, HOP = 512, 320  # 32 ms window, 20 ms hop at 16 kHz
BUCKET = SAMPLE_RATE  # `bucket_length`: signals are zero-padded to whole seconds so that jitted shapes repeat


def hann_window(n: int) -> jnp.ndarray:
  """The periodic Hann window `[n]` (scipy's `get_window("hann", n)`)."""
  return 0.5 - 0.5 * jnp.cos(2.0 * jnp.pi * jnp.arange(n) / n)


def _padding(length: int, n_fft: int, hop: int) -> tuple[int, int]:
  """(left, right) zero padding of a signal of `length` samples: centre, then whole hops."""
  left = n_fft // 2
  padded = length + 2 * left
  extra = (-(padded - n_fft)) % hop
  return left, left + extra


def num_frames(length: int, n_fft: int = N_FFT, hop: int = HOP) -> int:
  """STFT frames of a signal of `length` samples (see the module docstring for the padding)."""
  left, right = _padding(length, n_fft, hop)
  return (length + left + right - n_fft) // hop + 1


def stft(signal: jnp.ndarray, n_fft: int = N_FFT, hop: int = HOP, window: jnp.ndarray | None = None) -> jnp.ndarray:
  """Complex spectrogram `[..., frames, n_fft // 2 + 1]` of a signal `[..., samples]`."""
  window = hann_window(n_fft) if window is None else window
  length = signal.shape[-1]
  left, right = _padding(length, n_fft, hop)
  padded = jnp.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(left, right)])
  frames = num_frames(length, n_fft, hop)
  index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  return jnp.fft.rfft(padded[..., index] * window, n=n_fft, axis=-1)


def istft(
  spectrum: jnp.ndarray, length: int, n_fft: int = N_FFT, hop: int = HOP, window: jnp.ndarray | None = None
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
  """Per-utterance mean/std normalization over frames of `[..., frames, bins]` (per bin).

  With `frames` (an int or a traced scalar), only the first `frames` frames count (the rest are
  padding, e.g. of a signal zero-padded to a fixed length so that a jitted shape repeats); the
  padding is normalized with the same statistics.

  Returns `(normalized, mean, std)`, mean and std `[..., 1, bins]`, so that an enhanced output can
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


def resynthesize(
  log_power_spectrum: jnp.ndarray,
  phase_source: jnp.ndarray,
  length: int,
  n_fft: int = N_FFT,
  hop: int = HOP,
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


def bucket_length(n: int, bucket: int = BUCKET) -> int:
  """The padded length (whole buckets, at least one) of a signal of `n` samples."""
  return max(bucket, -(-n // bucket) * bucket)


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
  """`x` padded along its first axis to `length`: zeros for signals `[n]`, the last item for frames."""
  return np.pad(x, [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1), mode="edge" if x.ndim > 1 else "constant")


# --- Files --------------------------------------------------------------------------------------------------------


def read_audio(path: str, max_seconds: float | None = None, what: str = "audio file") -> tuple[np.ndarray, int]:
  """`(float32 mono signal [n], rate)` of any file libsndfile reads (WAV of any sub-format, FLAC, OGG,
  ...); channels are averaged, integer samples scaled to [-1, 1). `max_seconds` reads only the start.
  UserError (one line) for a missing or unreadable file; `what` names the file in it."""
  import soundfile

  if not os.path.isfile(path):
    raise UserError(f"{what} {path!r} does not exist; pass an existing audio file (WAV, FLAC, OGG)")
  try:
    with soundfile.SoundFile(path) as f:
      frames = -1 if max_seconds is None else int(max_seconds * f.samplerate)
      data = f.read(frames, dtype="float32", always_2d=True)
      rate = f.samplerate
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{what} {path!r} is not a readable audio file ({reason}); convert it to WAV or FLAC") from None
  return data.mean(axis=1), int(rate)


def write_audio(path: str, signal: np.ndarray, rate: int) -> None:
  """Writes mono `signal` `[n]` (clipped to [-1, 1]) as 16-bit PCM; the container follows the file
  name's extension (.wav, .flac, ...)."""
  import soundfile

  pcm = np.round(np.clip(np.asarray(signal), -1.0, 1.0) * 32767.0).astype(np.int16)
  soundfile.write(path, pcm, int(rate), subtype="PCM_16")


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg", ".webm")


def read_lips(path: str, frames: int, shape: tuple[int, int, int] = (16, 24, 3)) -> np.ndarray:
  """uint8 `[frames, *shape]` mouth images from a `.npy` (uint8 0-255, or float 0-1 / 0-255) or a
  video (with imageio installed). UserError (one line) when the file is missing, unreadable or of
  another shape."""
  if not path:
    raise UserError(
      f"this model sees the lips: pass --config.lips=FILE.npy (uint8 [T, {', '.join(map(str, shape))}] mouth frames "
      "at 50 fps)"
    )
  if not os.path.isfile(path):
    raise UserError(f"lips file {path!r} does not exist; pass --config.lips=FILE.npy with [T, 16, 24, 3] mouth frames")
  if path.lower().endswith(VIDEO_SUFFIXES):
    lips = _read_video(path)
  else:
    try:
      lips = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise UserError(f"lips file {path!r} is not a .npy array ({e}); save the mouth frames with numpy.save") from None
  expected = (frames, *shape)
  if lips.shape != expected:
    raise UserError(
      f"lips {path!r} have shape {tuple(lips.shape)}, expected {expected}: {frames} mouth images of "
      f"{shape[0]}x{shape[1]} RGB, one per 20 ms of audio (50 fps, T = number of STFT frames of the input)"
    )
  if lips.dtype == np.uint8:
    return lips
  if not np.issubdtype(lips.dtype, np.floating) and not np.issubdtype(lips.dtype, np.integer):
    raise UserError(f"lips {path!r} have dtype {lips.dtype}; expected uint8 or float")
  lips = lips.astype(np.float32)
  scale = 255.0 if lips.max(initial=0.0) <= 1.0 else 1.0
  return np.clip(np.round(lips * scale), 0, 255).astype(np.uint8)


def _read_video(path: str) -> np.ndarray:
  try:
    import imageio.v3 as iio
  except ImportError:
    raise UserError(
      f"no video decoder is installed to read {path!r}: extract the 16x24 mouth frames at 50 fps to a .npy "
      "array [T, 16, 24, 3] (or pip install imageio[ffmpeg])"
    ) from None
  return np.asarray(iio.imread(path))
