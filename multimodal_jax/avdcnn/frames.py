"""Training frames for frame-wise speech enhancement (AVDCNN), with random access for grain.

Features, per utterance as in the AVDCNN paper: the STFT (`audio.N_FFT` Hann window, `audio.HOP`
hop, 16 kHz) log power of the noisy signal is normalized per utterance and bin (mean / std over its
frames); the clean target is the clean log power normalized with the NOISY utterance's mean and std
(the only statistics known at inference), floored at `floor`; each frame is seen with its
±`radius` neighbours. Signals are zero-padded to whole seconds so that the jitted feature function
sees few shapes; the padding is masked out of the statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import audio


@functools.partial(jax.jit, static_argnames=("floor",))
def _training_features(noisy: jnp.ndarray, clean: jnp.ndarray, frames: jnp.ndarray, floor: float):
  """Normalized noisy log power and clean target `[frames_of_bucket, 257]` of zero-padded signals,
  and the noisy statistics (mean, std) `[1, 257]` that normalized them."""
  noisy_lp = audio.log_power(audio.stft(noisy))
  clean_lp = audio.log_power(audio.stft(clean))
  x, mean, std = audio.normalize_utterance(noisy_lp, frames=frames)
  return x, jnp.maximum((clean_lp - mean) / std, floor), mean, std


def utterance_features(example: dict, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """`(noisy_normalized, clean_target, mean, std)` of one example with `noisy` and `clean` float
  signals `[n]`: the first two float32 `[T, 257]`, the noisy log-power statistics float32 `[257]`."""
  n = len(example["noisy"])
  frames = audio.num_frames(n)
  padded = audio.bucket_length(n)
  x, y, mean, std = _training_features(
    audio.pad_to(np.asarray(example["noisy"], np.float32), padded),
    audio.pad_to(np.asarray(example["clean"], np.float32), padded),
    np.int32(frames),
    floor,
  )
  return np.asarray(x[:frames]), np.asarray(y[:frames]), np.asarray(mean[0]), np.asarray(std[0])


class FrameSource:
  """Random access to training frames with their ±`radius` context (grain-compatible: `__len__`,
  `__getitem__`; `batch(rows)` gathers many at once).

  Record i: `audio` float32 `[257, 2r + 1]` (normalized noisy log power), `lips` uint8
  `[2r + 1, 16, 24, 3]`, `target` float32 `[257]` (the normalized clean frame), `mean`, `std` float32
  `[257]` (the noisy utterance's log-power statistics, which de-normalize `audio` and `target`).
  Context frames past an utterance's ends repeat its edge frame. Features are computed once, at
  construction, from `examples` (a random-access source of dicts with `noisy`, `clean`, `lips`).
  """

  def __init__(self, examples, floor: float, radius: int = 2):
    noisy, target, lips, start, end, means, stds, utterance = [], [], [], [], [], [], [], []
    offset = 0
    for i in range(len(examples)):
      example = examples[i]
      x, y, mean, std = utterance_features(example, floor)
      t = len(x)
      if example["lips"].shape[0] != t:
        raise ValueError(f"an example has {example['lips'].shape[0]} mouth frames for {t} audio frames")
      means.append(mean)
      stds.append(std)
      utterance.append(np.full(t, i, np.int32))
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
    self._offsets = np.arange(-radius, radius + 1)
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

  def sample_batches(self, seed: int, batch_size: int, count: int) -> list[dict]:
    """`count` batches of `batch_size` distinct frames (fewer when the frames run out, at least one
    batch), in the order of a permutation drawn from `seed`: the frames of "precise" batch-norm
    statistics."""
    order = np.random.default_rng(seed).permutation(len(self))
    size = min(batch_size, len(self))
    return [self.batch(order[i * size : (i + 1) * size]) for i in range(max(1, min(count, len(self) // size)))]
