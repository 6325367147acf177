"""Frame-wise speech enhancement around AVDCNN (Hou et al. 2018): per-utterance features, the
training-frame store, whole-utterance enhancement, and reading a user's recording and mouth frames.

Features (per utterance, as in the paper): the STFT (512-sample Hann window, hop 320, 16 kHz) log
power of the noisy signal is normalised per utterance and bin (mean / std over its frames); the
clean target is the clean log power normalised with the NOISY utterance's mean and std (the only
statistics known at inference), floored at `floor`; each frame is seen with its ±2 neighbours. The
enhanced frames are de-normalised with the same noisy statistics and resynthesised with the noisy
phase by overlap-add. Signals are zero-padded to whole seconds so that jitted shapes repeat; the
padding is masked out of the statistics.
"""

from __future__ import annotations

import functools
import os
import wave

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import audio
from multimodal_jax.errors import UserError
from multimodal_jax.models import avdcnn

SAMPLE_RATE = 16000
N_FFT, HOP = 512, 320
RADIUS = avdcnn.CONTEXT // 2  # ±2 context frames
BUCKET = SAMPLE_RATE  # signals are zero-padded to whole seconds so that jitted shapes repeat
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg", ".webm")


# --- Features -----------------------------------------------------------------------------------------------------


def bucket_length(n: int) -> int:
  """The padded length (whole seconds, at least one) of a signal of `n` samples."""
  return max(BUCKET, -(-n // BUCKET) * BUCKET)


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
  """`x` padded along its first axis to `length`: zeros for signals `[n]`, the last item for frames."""
  return np.pad(x, [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1), mode="edge" if x.ndim > 1 else "constant")


def context_batch(normalised: jnp.ndarray, lips: jnp.ndarray | None, frames) -> dict:
  """The model's inputs for every frame of an utterance: `audio` `[T, 257, 5]` (each normalised frame
  with its ±2 neighbours) and, with `lips` `[T, 16, 24, 3]`, `lips` `[T, 5, 16, 24, 3]`; context is
  clamped to the first `frames` frames (the rest are padding)."""
  index = audio.context_index(normalised.shape[0], RADIUS, frames)
  batch = {"audio": jnp.swapaxes(normalised[index], 1, 2)}
  return batch | ({"lips": lips[index]} if lips is not None else {})


@functools.partial(jax.jit, static_argnames=("floor",))
def _training_features(noisy: jnp.ndarray, clean: jnp.ndarray, frames: jnp.ndarray, floor: float):
  """Normalised noisy log power and clean target `[frames_of_bucket, 257]` of zero-padded signals,
  and the noisy statistics (mean, std) `[1, 257]` that normalised them."""
  noisy_lp = audio.log_power(audio.stft(noisy, N_FFT, HOP))
  clean_lp = audio.log_power(audio.stft(clean, N_FFT, HOP))
  x, mean, std = audio.normalize_utterance(noisy_lp, frames=frames)
  return x, jnp.maximum((clean_lp - mean) / std, floor), mean, std


def utterance_features(example: dict, floor: float, statistics: bool = False):
  """`(noisy_normalised, clean_target)`, each float32 `[T, 257]`, of one example; with `statistics`,
  also the noisy utterance's per-bin log-power mean and std, float32 `[257]` each."""
  n = len(example["noisy"])
  frames = audio.num_frames(n, N_FFT, HOP)
  padded = bucket_length(n)
  x, y, mean, std = _training_features(
    pad_to(np.asarray(example["noisy"], np.float32), padded),
    pad_to(np.asarray(example["clean"], np.float32), padded),
    np.int32(frames),
    floor,
  )
  out = (np.asarray(x[:frames]), np.asarray(y[:frames]))
  return out + (np.asarray(mean[0]), np.asarray(std[0])) if statistics else out


class FrameSource:
  """Random access to training frames with their ±2 context (grain-compatible: `__len__`, `__getitem__`).

  Record i: `audio` float32 `[257, 5]` (normalised noisy log power), `lips` uint8 `[5, 16, 24, 3]`,
  `target` float32 `[257]` (the normalised clean frame), `mean`, `std` float32 `[257]` (the noisy
  utterance's log-power statistics, which de-normalise `audio` and `target`). Context frames past an
  utterance's ends repeat its edge frame. Features are computed once, at construction.
  """

  def __init__(self, examples, floor: float):
    noisy, target, lips, start, end, means, stds, utterance = [], [], [], [], [], [], [], []
    offset = 0
    for i in range(len(examples)):
      example = examples[i]
      x, y, mean, std = utterance_features(example, floor, statistics=True)
      means.append(mean)
      stds.append(std)
      utterance.append(np.full(len(x), i, np.int32))
      t = len(x)
      if example["lips"].shape[0] != t:
        raise ValueError(f"an example has {example['lips'].shape[0]} mouth frames for {t} audio frames")
      noisy.append(x)
      target.append(y)
      lips.append(np.asarray(example["lips"], np.uint8))
      start.append(np.full(t, offset, np.int64))
      end.append(np.full(t, offset + t - 1, np.int64))
      offset += t
    if not offset:
      raise ValueError("no training frames")
    self.noisy = np.concatenate(noisy)
    self.target = np.concatenate(target)
    self.lips = np.concatenate(lips)
    self._start = np.concatenate(start)
    self._end = np.concatenate(end)
    self._offsets = np.arange(-RADIUS, RADIUS + 1)
    self.mean, self.std = np.stack(means), np.stack(stds)  # [utterances, 257]
    self._utterance = np.concatenate(utterance)

  def __len__(self) -> int:
    return len(self.noisy)

  def __getitem__(self, i) -> dict:
    return {key: value[0] for key, value in self.batch(np.asarray([int(i)])).items()}

  def batch(self, rows: np.ndarray) -> dict:
    """The records `rows` stacked (vectorised)."""
    index = np.clip(rows[:, None] + self._offsets[None, :], self._start[rows, None], self._end[rows, None])
    u = self._utterance[rows]
    batch = {"audio": np.swapaxes(self.noisy[index], 1, 2), "lips": self.lips[index], "target": self.target[rows]}
    return batch | {"mean": self.mean[u], "std": self.std[u]}


# --- Enhancement --------------------------------------------------------------------------------------------------


class Enhancer:
  """Enhances whole utterances: STFT -> normalised log power -> model per frame -> de-normalise ->
  resynthesis with the noisy phase. One jitted function per padded length (whole seconds)."""

  def __init__(self, model: avdcnn.AVDCNN, params, batch_stats):
    self.model = model
    self.params = params
    self.batch_stats = batch_stats
    self._fn = jax.jit(self._enhance_padded)

  def _enhance_padded(self, params, batch_stats, noisy, lips, frames):
    spectrum = audio.stft(noisy, N_FFT, HOP)
    log_power = audio.log_power(spectrum)
    normalised, mean, std = audio.normalize_utterance(log_power, frames=frames)
    batch = context_batch(normalised, lips, frames)
    out = avdcnn.apply_inference(self.model, params, batch_stats, batch)["audio"]
    valid = (jnp.arange(log_power.shape[0]) < frames)[:, None]
    enhanced = jnp.where(valid, out * std + mean, log_power)
    return audio.resynthesize(enhanced, spectrum, noisy.shape[0], N_FFT, HOP)

  def __call__(self, noisy: np.ndarray, lips: np.ndarray | None) -> np.ndarray:
    """Enhanced float32 `[N]` of a 16 kHz float signal `[N]` and its uint8 mouth frames `[T, 16, 24, 3]`
    (ignored by the audio-only model; None is fine there)."""
    n = len(noisy)
    frames = audio.num_frames(n, N_FFT, HOP)
    padded = bucket_length(n)
    if not self.model.config.visual:
      lips = None  # the audio-only model takes no lips
    elif lips is None:
      raise ValueError("this model sees the lips: pass the mouth frames, uint8 [T, 16, 24, 3]")
    else:
      lips = pad_to(np.asarray(lips), audio.num_frames(padded, N_FFT, HOP))
    out = self._fn(self.params, self.batch_stats, pad_to(np.asarray(noisy, np.float32), padded), lips, np.int32(frames))
    return np.asarray(out[:n])


# --- A user's recording and mouth frames --------------------------------------------------------------------------


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """`(float32 mono signal in [-1, 1], rate)` of a PCM wav (8/16/32-bit; channels are averaged)."""
  if not os.path.isfile(path):
    raise UserError(f"input {path!r} does not exist; pass a wav file with --config.input=FILE.wav")
  try:
    with wave.open(path, "rb") as f:
      rate, width, channels, count = f.getframerate(), f.getsampwidth(), f.getnchannels(), f.getnframes()
      raw = f.readframes(count)
  except (wave.Error, EOFError) as e:
    raise UserError(f"input {path!r} is not a readable PCM wav file ({e}); convert it to 16-bit PCM wav") from None
  if width == 1:
    signal = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
  elif width in (2, 4):
    dtype = np.int16 if width == 2 else np.int32
    signal = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max + 1)
  else:
    raise UserError(f"input {path!r} has {8 * width}-bit samples; convert it to 16-bit PCM wav")
  return signal.reshape(-1, channels).mean(axis=1), rate


def write_wav(path: str, signal: np.ndarray, rate: int) -> None:
  """Writes a mono 16-bit PCM wav (samples clipped to [-1, 1])."""
  pcm = np.round(np.clip(signal, -1.0, 1.0) * 32767.0).astype("<i2")
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(pcm.tobytes())


def read_lips(path: str, frames: int) -> np.ndarray:
  """uint8 `[frames, 16, 24, 3]` mouth images from a `.npy` (uint8 0-255, or float 0-1 / 0-255) or a video."""
  if not path:
    raise UserError(
      "this model sees the lips: pass --config.lips=FILE.npy (uint8 [T, 16, 24, 3] mouth frames at 50 fps)"
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
  expected = (frames, *avdcnn.LIPS_SHAPE)
  if lips.shape != expected:
    raise UserError(
      f"lips {path!r} have shape {tuple(lips.shape)}, expected {expected}: {frames} mouth images of 16x24 RGB, "
      "one per 20 ms of audio (50 fps, T = number of STFT frames of the input)"
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
