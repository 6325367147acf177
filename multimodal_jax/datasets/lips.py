"""RENDERED lip video for AVDCNN: one 16x24 RGB mouth image per 20 ms audio frame.

No real lip video installs with any package, so the visual stream is drawn, not filmed. Each frame
is a mouth drawn from five shape parameters in [0, 1] (SHAPE_PARAMS: opening, width, rounding,
teeth and tongue visibility):

* synthesised speech: espeak-ng's phoneme start times, each phoneme mapped to a viseme (a target
  shape) held until the next phoneme, its opening scaled by the frame's loudness (the jaw opens
  wider on louder syllables);
* recorded speech: the clean signal's frames: loudness -> opening, spectral centroid -> width
  (spread lips), low-band energy share -> rounding, high-band share -> teeth.

The targets are smoothed with a Gaussian of 24 ms (coarticulation) and lead the audio by one frame,
as lips do. Masks are drawn on a 3x finer grid and averaged (anti-aliasing). Each speaker has a fixed appearance (skin and lip colour, mouth size, lighting direction)
derived from its name; each utterance adds small head motion, brightness change and sensor noise.
Frame t is centred on sample t * HOP, as frame t of `multimodal_jax.audio.stft(audio, 512, 320)`,
and an utterance of n samples has `audio.num_frames(n, 512, 320)` images.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from multimodal_jax import audio as audio_lib
from multimodal_jax.audio import HOP, N_FFT, SAMPLE_RATE  # 50 frames per second

HEIGHT, WIDTH = 16, 24
SHAPE_PARAMS = ("opening", "width", "rounding", "teeth", "tongue")
REST = (0.0, 0.45, 0.15, 0.0, 0.0)  # Closed, relaxed mouth.
SMOOTH_FRAMES = 1.2  # Gaussian sigma of the coarticulation smoothing, in frames.
LEAD_FRAMES = 1  # The mouth shape leads the sound by this many frames.
NOISE_STD = 3.0  # Sensor noise, in 0-255 pixel units.

# Viseme targets (opening, width, rounding, teeth, tongue) by phoneme class.
_VISEMES = {
  "closed": (0.0, 0.5, 0.1, 0.0, 0.0),  # p b m
  "labiodental": (0.12, 0.55, 0.0, 1.0, 0.0),  # f v
  "glide": (0.18, 0.1, 1.0, 0.0, 0.0),  # w
  "close_round": (0.3, 0.12, 0.95, 0.0, 0.1),  # u
  "open_round": (0.6, 0.25, 0.75, 0.1, 0.2),  # o
  "open": (1.0, 0.55, 0.0, 0.35, 0.35),  # a
  "mid": (0.55, 0.65, 0.0, 0.5, 0.25),  # e, schwa
  "close_spread": (0.28, 0.95, 0.0, 0.9, 0.1),  # i, j
  "dental": (0.25, 0.55, 0.0, 0.7, 1.0),  # th
  "lateral": (0.35, 0.55, 0.0, 0.5, 0.8),  # l
  "postalveolar": (0.25, 0.3, 0.6, 0.8, 0.1),  # sh, ch
  "alveolar": (0.2, 0.6, 0.0, 0.85, 0.3),  # t d n s z r
  "velar": (0.35, 0.5, 0.05, 0.3, 0.2),  # k g ng h
  "pause": REST,
  "other": (0.3, 0.5, 0.1, 0.3, 0.2),
}


def viseme(phoneme: str) -> str:
  """The viseme class of an espeak-ng phoneme name (e.g. 'p' -> 'closed', 'aI' -> 'open')."""
  name = phoneme.strip("'\",%=")
  if not name or name.startswith("_"):
    return "pause"
  if name[:2] in ("tS", "dZ") or name[0] in "SZ":
    return "postalveolar"
  first = name[0]
  for letters, kind in (
    ("pbm", "closed"),
    ("fv", "labiodental"),
    ("wW", "glide"),
    ("uUyY", "close_round"),
    ("oO0", "open_round"),
    ("aA&V", "open"),
    ("eE3@", "mid"),
    ("iIj", "close_spread"),
    ("TD", "dental"),
    ("lL", "lateral"),
    ("tdnszr*R", "alveolar"),
    ("kgNhxXGqc", "velar"),
  ):
    if first in letters:
      return kind
  return "other"


def frame_samples(num_samples: int) -> np.ndarray:
  """Centre sample of each frame, int64 `[T]`, T = audio.num_frames(num_samples, N_FFT, HOP)."""
  return np.arange(audio_lib.num_frames(num_samples, N_FFT, HOP), dtype=np.int64) * HOP


def smooth(shapes: np.ndarray, sigma: float = SMOOTH_FRAMES, lead: int = LEAD_FRAMES) -> np.ndarray:
  """Gaussian smoothing over time of `[T, P]` (edges repeated), shifted `lead` frames earlier."""
  radius = int(np.ceil(3 * sigma))
  kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  kernel /= kernel.sum()
  padded = np.concatenate([np.repeat(shapes[:1], radius, 0), shapes, np.repeat(shapes[-1:], radius + lead, 0)])
  out = np.stack([np.convolve(padded[:, p], kernel, mode="valid") for p in range(shapes.shape[1])], axis=1)
  return out[lead : lead + len(shapes)].astype(np.float32)


def loudness(audio: np.ndarray) -> np.ndarray:
  """Frame loudness in [0, 1], float32 `[T]`: 0 at 40 dB below the loudest frame or lower, 1 at it."""
  level_db = 10 * np.log10(frame_power(audio)[:, : N_FFT // 4 + 1].sum(axis=1) + 1e-12)
  return np.clip((level_db - level_db.max() + 40.0) / 40.0, 0.0, 1.0).astype(np.float32)


def shapes_from_phonemes(phonemes, num_samples: int, jaw: np.ndarray | None = None) -> np.ndarray:
  """Mouth shapes `[T, 5]` from phoneme start samples ((sample, name), ...) at 16 kHz.

  Frames before the first phoneme and in pauses are at rest; each phoneme holds until the next one
  starts. `jaw` (`[T]` in [0, 1], e.g. `loudness(audio)`) scales the opening by 0.35 + 0.65 * jaw, as
  the jaw opens wider on louder syllables.
  """
  centres = frame_samples(num_samples)
  starts = np.array([s for s, _ in phonemes], np.int64)
  targets = np.array([_VISEMES[viseme(name)] for _, name in phonemes] or [REST], np.float32)
  index = np.searchsorted(starts, centres, side="right") - 1
  shapes = np.where((index >= 0)[:, None], targets[np.maximum(index, 0)], np.asarray(REST, np.float32))
  if jaw is not None:
    shapes[:, 0] *= 0.35 + 0.65 * jaw
  return smooth(shapes)


def frame_power(audio: np.ndarray) -> np.ndarray:
  """Power spectra `[T, N_FFT // 2 + 1]` of `audio [n]` with the frames of multimodal_jax.audio.stft."""
  audio = np.asarray(audio, np.float64)
  frames = audio_lib.num_frames(len(audio), N_FFT, HOP)
  left = N_FFT // 2
  padded = np.zeros((frames - 1) * HOP + N_FFT)
  padded[left : left + len(audio)] = audio[: len(padded) - left]
  index = np.arange(frames)[:, None] * HOP + np.arange(N_FFT)
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
  spectrum = np.fft.rfft(padded[index] * window, axis=-1)
  return spectrum.real**2 + spectrum.imag**2


def shapes_from_audio(audio: np.ndarray) -> np.ndarray:
  """Mouth shapes `[T, 5]` of recorded speech `[n]` (16 kHz) from its frames' loudness and spectral
  shape (0-4 kHz, so 8 kHz recordings and wide-band ones are treated alike)."""
  power = frame_power(audio)[:, : N_FFT // 4 + 1]  # Bins up to 4 kHz.
  freqs = np.arange(power.shape[1]) * SAMPLE_RATE / N_FFT
  total = power.sum(axis=1) + 1e-12
  level_db = 10 * np.log10(total)
  level_db -= level_db.max()
  active = np.clip((level_db + 40.0) / 10.0, 0.0, 1.0)  # 0 in silence, 1 from -30 dB.
  opening = np.clip((level_db + 32.0) / 28.0, 0.0, 1.0) ** 0.8
  centroid = (power * freqs).sum(axis=1) / total
  low = power[:, freqs < 700].sum(axis=1) / total
  high = power[:, freqs > 2500].sum(axis=1) / total
  width = np.clip((centroid - 500.0) / 1200.0, 0.0, 1.0)
  rounding = np.clip((low - 0.85) / 0.12, 0.0, 1.0) * (1.0 - width)
  teeth = np.clip(2.0 * high, 0.0, 1.0)
  tongue = 0.4 * opening
  speech = np.stack([opening, 0.3 + 0.7 * width, rounding, teeth, tongue], axis=1)
  rest = np.asarray(REST)
  shapes = active[:, None] * speech + (1.0 - active[:, None]) * rest
  return smooth(shapes.astype(np.float32))


# ---------------------------------------------------------------- appearance and drawing


@dataclasses.dataclass(frozen=True)
class Appearance:
  """A speaker's look: colours RGB in [0, 1], mouth size in pixels, light gradient per pixel."""

  skin: tuple[float, float, float]
  lips: tuple[float, float, float]
  inside: tuple[float, float, float]
  teeth: tuple[float, float, float]
  tongue: tuple[float, float, float]
  half_width: float
  lip_thickness: float
  light: tuple[float, float]
  centre: tuple[float, float]


def appearance(speaker: str) -> Appearance:
  """The fixed appearance of `speaker`, drawn from a generator seeded with its name."""
  rng = np.random.default_rng(zlib.crc32(speaker.encode()))
  tone = rng.uniform(0.25, 0.9)  # Dark to light skin.
  skin = np.array([0.95, 0.72, 0.58]) * tone + np.array([0.05, 0.04, 0.03]) + rng.uniform(-0.03, 0.03, 3)
  lips = skin * np.array([0.92, 0.66, 0.68]) * rng.uniform(0.85, 1.0) + np.array([0.06, 0.0, 0.02])
  return Appearance(
    skin=tuple(np.clip(skin, 0, 1)),
    lips=tuple(np.clip(lips, 0, 1)),
    inside=tuple(np.array([0.12, 0.04, 0.05]) * rng.uniform(0.7, 1.1)),
    teeth=tuple(np.array([0.92, 0.9, 0.82]) * rng.uniform(0.85, 1.0)),
    tongue=tuple(np.array([0.75, 0.32, 0.35]) * rng.uniform(0.85, 1.1)),
    half_width=float(rng.uniform(6.5, 8.0)),
    lip_thickness=float(rng.uniform(1.3, 2.2)),
    light=(float(rng.uniform(-0.25, 0.25)), float(rng.uniform(-0.2, 0.1))),
    centre=(float(rng.uniform(11.5, 12.5)), float(rng.uniform(8.0, 9.0))),
  )


SUPERSAMPLE = 3  # Sub-pixels per pixel side: masks are drawn hard and averaged (anti-aliasing).


def draw(
  shapes: np.ndarray, look: Appearance, motion: np.ndarray | None = None, brightness: np.ndarray | None = None
) -> np.ndarray:
  """Draws mouths, float32 `[T, HEIGHT, WIDTH, 3]` in [0, 1] (no noise).

  Args:
    shapes: `[T, 5]` shape parameters (SHAPE_PARAMS) in [0, 1].
    look: the speaker's appearance.
    motion: `[T, 3]` head motion (dx, dy pixels, relative scale change); None for none.
    brightness: `[T]` lighting gain; None for 1.
  """
  shapes = np.clip(np.asarray(shapes, np.float32), 0.0, 1.0)
  t, k = len(shapes), SUPERSAMPLE
  motion = np.zeros((t, 3), np.float32) if motion is None else np.asarray(motion, np.float32)
  brightness = np.ones(t, np.float32) if brightness is None else np.asarray(brightness, np.float32)
  opening, width, rounding, teeth, tongue = (shapes[:, i, None, None] for i in range(5))
  scale = 1.0 + motion[:, 2, None, None]
  cx = look.centre[0] + motion[:, 0, None, None]
  cy = look.centre[1] + motion[:, 1, None, None]
  x = ((np.arange(WIDTH * k, dtype=np.float32) + 0.5) / k)[None, None, :] - cx
  y = ((np.arange(HEIGHT * k, dtype=np.float32) + 0.5) / k)[None, :, None] - cy
  half_width = scale * look.half_width * (0.85 + 0.35 * width - 0.3 * rounding)
  inner_h = scale * (0.15 + 3.6 * opening)
  inner_w = half_width * (0.78 - 0.15 * rounding)
  upper = inner_h + scale * look.lip_thickness * (1.0 + 0.3 * rounding)
  lower = inner_h + scale * look.lip_thickness * (1.25 + 0.3 * rounding)
  # Layers drawn in order on the sub-pixel grid: 0 skin, 1 lips, 2 mouth cavity, 3 tongue, 4 teeth.
  # Upper teeth and tongue cover at most 80% of the opening's half height, so an open mouth stays
  # dark inside.
  in_mouth = (x / inner_w) ** 2 + (y / inner_h) ** 2 < 1.0
  layer = ((x / (half_width + 0.8)) ** 2 + (y / np.where(y < 0, upper, lower)) ** 2 < 1.0).astype(np.int8)
  layer[in_mouth] = 2
  layer[in_mouth & (tongue > 0.05) & (y > inner_h - np.minimum(0.2 + 1.2 * tongue, 0.8 * inner_h))] = 3
  layer[in_mouth & (teeth > 0.05) & (y < -inner_h + np.minimum(0.2 + 1.2 * teeth, 0.8 * inner_h))] = 4
  blocks = layer.reshape(t, HEIGHT, k, WIDTH, k).transpose(0, 1, 3, 2, 4).reshape(t, HEIGHT, WIDTH, k * k)
  share = np.stack([(blocks == i).sum(axis=-1) for i in range(5)], axis=-1).astype(np.float32) / (k * k)
  colours = np.asarray([look.skin, look.lips, look.inside, look.tongue, look.teeth], np.float32)
  px = np.arange(WIDTH, dtype=np.float32)[None, None, :] + 0.5 - cx
  py = np.arange(HEIGHT, dtype=np.float32)[None, :, None] + 0.5 - cy
  chin = 1.0 - 0.12 * np.clip(py / HEIGHT * 2.0, 0.0, 1.0)  # Shadow below the mouth, on skin.
  image = share[..., :1] * colours[0] * chin[..., None] + share[..., 1:] @ colours[1:]
  light = 1.0 + look.light[0] * px / WIDTH * 2.0 + look.light[1] * py / HEIGHT * 2.0
  image = image * light[..., None] * brightness[:, None, None, None]
  return np.clip(image, 0.0, 1.0).astype(np.float32)


def head_motion(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray]:
  """Slow random head motion `[T, 3]` (dx, dy up to ~1.5 px, scale up to ~4%) and brightness `[T]`."""
  steps = rng.normal(0.0, [0.12, 0.08, 0.004], (frames, 3))
  walk = smooth(np.cumsum(steps, axis=0), sigma=3.0, lead=0)
  walk = walk + rng.uniform([-0.8, -0.6, -0.05], [0.8, 0.6, 0.05])
  motion = np.clip(walk, [-1.5, -1.2, -0.08], [1.5, 1.2, 0.08]).astype(np.float32)
  flicker = smooth(rng.normal(0.0, 0.01, (frames, 1)).cumsum(0), sigma=3.0, lead=0)[:, 0]
  brightness = np.clip(rng.uniform(0.85, 1.12) + flicker, 0.7, 1.25).astype(np.float32)
  return motion, brightness


def render(shapes: np.ndarray, speaker: str, rng: np.random.Generator, noise_std: float = NOISE_STD) -> np.ndarray:
  """Mouth frames uint8 `[T, HEIGHT, WIDTH, 3]` of `shapes [T, 5]`, with the speaker's appearance,
  random head motion, brightness and sensor noise (all from `rng`)."""
  articulation = rng.uniform(0.8, 1.15)  # How widely this take opens the mouth.
  shapes = np.asarray(shapes, np.float32) * np.array([articulation, 1, 1, 1, 1], np.float32)
  motion, brightness = head_motion(rng, len(shapes))
  image = draw(shapes, appearance(speaker), motion, brightness) * 255.0
  image = image + rng.normal(0.0, noise_std, image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_utterance(audio: np.ndarray, speaker: str, phonemes=None, seed: int = 0) -> np.ndarray:
  """The rendered lip stream uint8 `[T, 16, 24, 3]` of a clean utterance `[n]` at 16 kHz.

  Args:
    audio: the clean speech (T = audio.num_frames(n, 512, 320)).
    speaker: sets the appearance.
    phonemes: ((start sample, espeak phoneme), ...) for synthesised speech; None for a recording,
      whose shapes come from the signal.
    seed: seeds head motion, brightness, articulation and sensor noise.
  """
  if phonemes is None:
    shapes = shapes_from_audio(audio)
  else:
    shapes = shapes_from_phonemes(phonemes, len(audio), loudness(audio))
  return render(shapes, speaker, np.random.default_rng([seed, zlib.crc32(speaker.encode())]))


def fixed_mouth(speaker: str = "neutral", num_frames: int | None = None) -> np.ndarray:
  """One constant neutral (closed, relaxed) mouth, uint8 `[16, 24, 3]`, or `[num_frames, 16, 24, 3]`
  repeated: the fixed-lip input of the paper's check that the visual stream is used."""
  image = np.rint(draw(np.asarray([REST], np.float32), appearance(speaker))[0] * 255.0).astype(np.uint8)
  return image if num_frames is None else np.repeat(image[None], num_frames, axis=0)
