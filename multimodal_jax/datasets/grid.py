"""The GRID audio-visual corpus (Cooke et al. 2006) as AV-speech examples, from a directory you provide.

GRID is not redistributable here; download it yourself and pass its root, laid out as the
corpus ships (the layout of the Zenodo release; `align/` and `audio/` are accepted too):

    GRID_DIR/s1/bbaf2n.mpg                video, 25 fps (decoded with PyAV or imageio-ffmpeg)
    GRID_DIR/audio_25k/s1/bbaf2n.wav      audio, 25 kHz (resampled to 16 kHz)
    GRID_DIR/alignments/s1/bbaf2n.align   word alignments (optional; give the transcript)

Instead of a video, an utterance may be `s1/bbaf2n.npy` (uint8 `[frames, H, W, 3]` at 25 fps) or a
folder `s1/bbaf2n/` of PNG frames in name order; these need no video decoder.

Examples have the features of `av_speech` (clean/noisy 16 kHz audio, `snr`, `noise`, `speaker`,
`text`, and `lips` uint8 `[T, 16, 24, 3]` at 50 fps, T = audio.num_frames(N, 512, 320)). The lips
are a fixed box of every frame (by default the centre-bottom of the face, see MOUTH_BOX), resized
to 16x24 by area averaging, and resampled from 25 to 50 fps by linear interpolation between
frames. Noise is mixed as in av_speech: train utterances get one training noise each, test
utterances every test noise at every test SNR; test speakers are held out. With a `noise_dir`, the
noises are the audio files there and no Debian package is needed.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from multimodal_jax import errors
from multimodal_jax.audio import SAMPLE_RATE
from multimodal_jax.data import prepared
from multimodal_jax.datasets import av_speech, noise_bank, noise_sources, speech_sources
from multimodal_jax.datasets import lips as lips_lib

VIDEO_FPS = 25.0
# (top, left, height, width) as fractions of the frame: GRID's 360x288 frames show the face
# centred, with the mouth in this box.
MOUTH_BOX = (0.62, 0.36, 0.24, 0.28)
VIDEO_EXTENSIONS = (".mpg", ".mp4", ".avi", ".mov")
AUDIO_DIRS = ("audio_25k", "audio")
ALIGN_DIRS = ("alignments", "align")
SILENCE_WORDS = ("sil", "sp")
TEST_FRACTION = 0.2  # Share of speakers held out for test when none are named (at least one).


@dataclasses.dataclass(frozen=True)
class Item:
  """One GRID utterance on disk: speaker, name, frames source, audio file, alignment (or '')."""

  speaker: str
  name: str
  frames: str
  audio: str
  align: str


def _first_existing(paths) -> str:
  return next((p for p in paths if os.path.exists(p)), "")


def scan(grid_dir: str) -> list[Item]:
  """The utterances of `grid_dir` that have both frames and audio, sorted.

  Raises:
    UserError: the directory does not exist or holds no such utterance.
  """
  if not os.path.isdir(grid_dir):
    raise errors.UserError(
      f"GRID directory {grid_dir!r} does not exist: set --config.grid_dir to the corpus root "
      "(s1/*.mpg videos and audio_25k/s1/*.wav)"
    )
  items = []
  skip = set(AUDIO_DIRS + ALIGN_DIRS)
  for speaker in sorted(os.listdir(grid_dir)):
    folder = os.path.join(grid_dir, speaker)
    if speaker in skip or not os.path.isdir(folder):
      continue
    names = {}
    for entry in sorted(os.listdir(folder)):
      path = os.path.join(folder, entry)
      stem, ext = os.path.splitext(entry)
      if os.path.isdir(path) or ext in VIDEO_EXTENSIONS + (".npy",):
        names.setdefault(stem if not os.path.isdir(path) else entry, path)
    for name, frames in sorted(names.items()):
      audio = _first_existing(
        [os.path.join(grid_dir, d, speaker, f"{name}.wav") for d in AUDIO_DIRS] + [os.path.join(folder, f"{name}.wav")]
      )
      align = _first_existing(
        [os.path.join(grid_dir, d, speaker, f"{name}.align") for d in ALIGN_DIRS]
        + [os.path.join(grid_dir, d, f"{name}.align") for d in ALIGN_DIRS]
      )
      if audio:
        items.append(Item(speaker, name, frames, audio, align))
  if not items:
    raise errors.UserError(
      f"GRID directory {grid_dir!r} holds no utterance with both frames and audio: expected SPEAKER/NAME.mpg "
      "(or NAME.npy, or a NAME/ folder of PNG frames) and audio_25k/SPEAKER/NAME.wav"
    )
  return items


def read_alignment(path: str) -> str:
  """The words of a GRID .align file ('start end word' per line), silences left out."""
  if not path:
    return ""
  with open(path, encoding="utf-8") as f:
    words = [line.split()[2] for line in f if len(line.split()) >= 3]
  return " ".join(w for w in words if w not in SILENCE_WORDS)


# ---------------------------------------------------------------- frames


def _decode_video(path: str) -> np.ndarray:
  try:
    import av
  except ImportError:
    av = None
  if av is not None:
    with av.open(path) as container:
      return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
  try:
    import imageio_ffmpeg
  except ImportError:
    raise errors.UserError(
      f"reading {path} needs a video decoder: 'pip install av' (or imageio-ffmpeg), or store the frames as "
      "SPEAKER/NAME.npy (uint8 [frames, H, W, 3])"
    ) from None
  reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
  meta = next(reader)
  width, height = meta["size"]
  return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def _read_png(path: str) -> np.ndarray:
  """A PNG frame of any mode as uint8 RGB `[H, W, 3]` (Pillow repeats gray over the channels)."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def read_frames(path: str) -> np.ndarray:
  """The video frames of an utterance, uint8 `[F, H, W, 3]`, from a video, .npy or PNG folder."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
    if not files:
      raise errors.UserError(f"frame folder {path} holds no .png frames")
    frames = np.stack([_read_png(os.path.join(path, f)) for f in files])
  elif path.endswith(".npy"):
    frames = np.load(path)
  else:
    frames = _decode_video(path)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise errors.UserError(f"{path}: expected uint8 RGB frames [frames, H, W, 3], got {frames.dtype} {frames.shape}")
  return frames


def _area_weights(size: int, start: float, stop: float, out: int) -> np.ndarray:
  """`[out, size]` weights averaging the pixels of [start, stop) (fractional edges) into `out` cells."""
  edges = np.linspace(start, stop, out + 1)
  pixels = np.arange(size)
  overlap = np.clip(np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels), 0, None)
  return overlap / overlap.sum(axis=1, keepdims=True)


def crop_mouth(frames: np.ndarray, box: tuple[float, float, float, float] | None = MOUTH_BOX) -> np.ndarray:
  """The `box` (top, left, height, width as fractions; None: the whole frame) of each frame, resized
  to `[F, 16, 24, 3]` by area averaging, float32 in 0-255."""
  _, h, w, _ = frames.shape
  top, left, height, width = box or (0.0, 0.0, 1.0, 1.0)
  rows = _area_weights(h, top * h, (top + height) * h, lips_lib.HEIGHT)
  cols = _area_weights(w, left * w, (left + width) * w, lips_lib.WIDTH)
  return np.einsum("rh,fhwc,kw->frkc", rows, frames.astype(np.float32), cols).astype(np.float32)


def to_audio_frames(crops: np.ndarray, num_samples: int, fps: float = VIDEO_FPS) -> np.ndarray:
  """Video crops `[F, 16, 24, 3]` at `fps` -> uint8 `[T, 16, 24, 3]`, one per STFT frame (frame t at
  t * 20 ms), linearly interpolated between the two nearest video frames (ends held)."""
  times = lips_lib.frame_samples(num_samples) / SAMPLE_RATE
  position = np.clip(times * fps, 0, len(crops) - 1)
  low = np.floor(position).astype(np.int64)
  high = np.minimum(low + 1, len(crops) - 1)
  frac = (position - low)[:, None, None, None].astype(np.float32)
  out = crops[low] * (1 - frac) + crops[high] * frac
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- examples


def split_speakers(speakers: list[str], test_speakers: tuple[str, ...] | None) -> tuple[set[str], set[str]]:
  """(train, test) speaker sets: `test_speakers`, or the last TEST_FRACTION (at least one)."""
  speakers = sorted(set(speakers), key=lambda s: (len(s), s))
  if test_speakers is None:
    k = max(1, round(TEST_FRACTION * len(speakers)))
    test_speakers = tuple(speakers[-k:])
  unknown = set(test_speakers) - set(speakers)
  if unknown:
    raise errors.UserError(f"test speakers {sorted(unknown)} are not in the GRID directory (it has {speakers})")
  test = set(test_speakers)
  if test == set(speakers):
    raise errors.UserError("every GRID speaker is a test speaker: leave at least one for training")
  return set(speakers) - test, test


def load_utterance(item: Item, box) -> tuple[speech_sources.Utterance, np.ndarray]:
  """(clean utterance at 16 kHz, peak-normalized; lips uint8 `[T, 16, 24, 3]`) of one item."""
  audio, rate = speech_sources.read_wav(item.audio)
  audio = speech_sources.normalize(speech_sources.to_16k(audio, rate))
  lips = to_audio_frames(crop_mouth(read_frames(item.frames), box), len(audio))
  return speech_sources.Utterance(audio, f"grid/{item.speaker}", read_alignment(item.align)), lips


def generate(items: list[Item], split: str, box, noise_config: str, seed: int = av_speech.SEED, noise_dir: str = ""):
  """Yields (key, example) of a split as av_speech stores them (audio int16); the noise of
  `noise_dir`'s files when given (`noise_bank.for_split`)."""
  loaded = [load_utterance(item, box) for item in items]
  bank = noise_bank.for_split(split, [u for u, _ in loaded], av_speech.CONFIGS[noise_config], noise_dir)
  for i, (utterance, lips) in enumerate(loaded):
    rng = np.random.default_rng([seed, zlib.crc32(f"{split}/{utterance.speaker}/{items[i].name}".encode())])
    n = len(utterance.audio)
    if split == "train":
      name = bank.names[int(rng.integers(len(bank.names)))]
      snr = float(rng.choice(av_speech.TRAIN_SNRS))
      noise = bank(name, rng, n, utterance.speaker)
      yield i, av_speech.make_example(utterance.audio, lips, noise, name, snr, utterance)
      continue
    for j, name in enumerate(bank.names):
      noise = bank(name, rng, n, utterance.speaker)
      for k, snr in enumerate(av_speech.TEST_SNRS):
        key = (i * len(bank.names) + j) * len(av_speech.TEST_SNRS) + k
        yield key, av_speech.make_example(utterance.audio, lips, noise, name, snr, utterance)


# ---------------------------------------------------------------- TFDS


@dataclasses.dataclass(eq=False)
class GridConfig(tfds.core.BuilderConfig):
  """Where GRID is and how to cut it: grid_dir, mouth box, test speakers, noise sizes (av_speech
  config), and a directory of noise files replacing the packages' noises ("" : none)."""

  grid_dir: str = ""
  box: tuple[float, float, float, float] | None = MOUTH_BOX
  test_speakers: tuple[str, ...] | None = None
  noise_config: str = "default"
  noise_dir: str = ""


def make_config(
  grid_dir: str, box=MOUTH_BOX, test_speakers=None, noise_config: str = "default", noise_dir: str | None = None
) -> GridConfig:
  """A GridConfig named after a hash of its settings (and of the noise files), so different settings
  are stored apart."""
  grid_dir = os.path.realpath(grid_dir)
  box = None if box is None else tuple(float(b) for b in box)
  test_speakers = None if test_speakers is None else tuple(test_speakers)
  settings = (grid_dir, box, test_speakers, noise_config)
  if noise_dir:
    noise_dir = os.path.realpath(noise_dir)
    files = noise_sources.noise_files(noise_dir)
    settings += (noise_dir, [(os.path.relpath(p, noise_dir), os.path.getsize(p)) for s in files.values() for p in s])
  key = repr(settings)
  return GridConfig(
    name=f"d{zlib.crc32(key.encode()):08x}",
    description=key,
    grid_dir=grid_dir,
    box=box,
    test_speakers=test_speakers,
    noise_config=noise_config,
    noise_dir=noise_dir or "",
  )


class Grid(tfds.core.GeneratorBasedBuilder):
  """GRID utterances with a fixed mouth crop at 50 fps, mixed with av_speech's noises."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  code_path = None  # We download nothing (see av_digits.AvDigits).

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="GRID corpus: clean and noisy 16 kHz speech with a 16x24 mouth crop per 20 ms frame.",
      features=av_speech.features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    items = scan(config.grid_dir)
    train, test = split_speakers([i.speaker for i in items], config.test_speakers)
    if not config.noise_dir:
      av_speech.check_packages()
    return {
      split: generate(
        [i for i in items if i.speaker in speakers], split, config.box, config.noise_config, noise_dir=config.noise_dir
      )
      for split, speakers in (("train", train), ("test", test))
    }

  def _generate_examples(self, examples):
    yield from examples


def load(
  grid_dir: str,
  data_dir: str | None = None,
  box: tuple[float, float, float, float] | None = MOUTH_BOX,
  test_speakers: tuple[str, ...] | None = None,
  noise_config: str = "default",
  noise_dir: str | None = None,
) -> dict[str, av_speech.DecodedSource]:
  """{'train', 'test'} random-access sources of GRID examples (av_speech's features), prepared on
  first use into `data_dir` (default: the TFDS data dir).

  Args:
    grid_dir: the corpus root (see the module docstring for the layout).
    data_dir: TFDS data dir.
    box: mouth box (top, left, height, width) as fractions of the frame; None for the whole frame.
    test_speakers: held-out speakers (folder names); None: the last 20% (at least one).
    noise_config: av_speech config whose noise sample counts to use ('default' or 'tiny').
    noise_dir: a directory of audio files (any rate, mono or stereo) mixed in instead of the Debian
      packages' noises, which are then not needed (`noise_sources.noise_files`).

  Raises:
    UserError: the directory is missing or empty, or a video cannot be decoded.
  """
  scan(grid_dir)  # Fails early with one line.
  config = make_config(grid_dir, box, test_speakers, noise_config, noise_dir)
  builder = Grid(config=config, data_dir=data_dir, file_format="array_record")
  if not builder.data_path.exists():
    builder.download_and_prepare()
  return {split: av_speech.DecodedSource(source) for split, source in prepared.data_sources(builder).items()}
