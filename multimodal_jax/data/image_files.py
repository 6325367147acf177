"""Image files decoded with Pillow into the model's pixels: channel count, size and normalization.

`load_image(path, size, channels)` reads any common kind of image (PNG in L, LA, RGB, RGBA, P, 1
and 16-bit I;16 modes, JPEG, BMP, TIFF, WebP, GIF's first frame) and returns uint8
`[size, size, channels]`. The geometry follows open_clip's evaluation preprocessing (torchvision's
`Resize(size, BICUBIC)` then `CenterCrop(size)`): the shorter side is resized to `size` with bicubic
filtering (Pillow's, antialiased when shrinking), the longer side to `int(size * long / short)`, and
the centre is cropped. A model trained here then sees the same pixels as one trained by open_clip.

Alpha is dropped, not composited (as Pillow's `convert("RGB")`, which open_clip and torchvision
use), so transparent pixels keep their stored colour. Grey from colour is Pillow's ITU-R 601 luma.
16-bit grey is scaled to 8 bits (value / 257, rounded); Pillow would otherwise clip it at 255.

Normalization presets (`normalization`): `openai` (CLIP's mean/std), `imagenet`, explicit numbers,
or `dataset` (per-channel statistics of the training images, `image_statistics`). A preset of three
channels used with one-channel images is averaged to one value.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from multimodal_jax.errors import UserError

# File name endings read as images (torchvision's ImageFolder list, plus GIF).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# What Pillow raises for a file that is not a readable image: unknown format (UnidentifiedImageError
# is an OSError), truncated data (OSError), broken headers (SyntaxError, ValueError, struct errors
# surface as these), and images over Pillow's pixel limit (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class UnreadableImage(Exception):
  """An image that cannot be decoded; the message is the reason (one line)."""


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
  values = np.asarray(image, dtype=np.float64)
  return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
  """`image` in mode L (`channels=1`) or RGB (`channels=3`), whatever its mode."""
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  if image.mode.startswith("I;16") or image.mode == "I":
    image = _sixteen_bit_to_8(image)
  elif image.mode == "F":
    image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
  elif image.mode in ("P", "PA"):
    image = image.convert("RGB")  # the palette's colours; transparency dropped as for RGBA
  target = "L" if channels == 1 else "RGB"
  return image if image.mode == target else image.convert(target)


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
  """The shorter side resized to `size` (bicubic), then the centred `size` x `size` crop."""
  width, height = image.size
  if (width, height) != (size, size):
    if width <= height:
      new = (size, int(size * height / width))
    else:
      new = (int(size * width / height), size)
    if new != (width, height):
      image = image.resize(new, Image.Resampling.BICUBIC)
    width, height = image.size
  if (width, height) == (size, size):
    return image
  left = round((width - size) / 2.0)
  top = round((height - size) / 2.0)
  return image.crop((left, top, left + size, top + size))


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image, dtype=np.uint8)
  return array.reshape(*array.shape[:2], channels)


def load_image(source: str | bytes, size: int, channels: int) -> np.ndarray:
  """An image file (a path, or its bytes) -> uint8 `[size, size, channels]`.

  Raises:
    UnreadableImage: the file is missing, is not an image, or is damaged.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Pillow warns about large or odd files; failures still raise
      with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return _pixels(resize_and_crop(to_channels(image, channels), size), channels)
  except FileNotFoundError:
    raise UnreadableImage("missing file") from None
  except _DECODE_ERRORS as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise UnreadableImage(f"{type(e).__name__}: {reason}"[:200]) from None


def array_to_image(array: np.ndarray) -> Image.Image:
  """Decoded pixels `[H, W]` or `[H, W, C]` (C = 1, 2, 3 or 4; uint8 or uint16) as a Pillow image."""
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype == np.uint16:
    array = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
  if array.dtype != np.uint8:
    raise ValueError(f"images must be uint8 or uint16 pixels, got {array.dtype}")
  if array.ndim == 2:
    return Image.fromarray(array, mode="L")
  modes = {2: "LA", 3: "RGB", 4: "RGBA"}
  if array.ndim != 3 or array.shape[-1] not in modes:
    raise ValueError(f"images must be [H, W] or [H, W, 1|2|3|4] pixels, got shape {array.shape}")
  return Image.fromarray(array, mode=modes[array.shape[-1]])


def preprocess_array(array: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Decoded pixels (see `array_to_image`) -> uint8 `[size, size, channels]`, as `load_image` does."""
  array = np.asarray(array)
  if array.dtype == np.uint8 and array.shape == (size, size, channels):
    return array
  return _pixels(resize_and_crop(to_channels(array_to_image(array), channels), size), channels)


def image_statistics(images: Iterable[np.ndarray], channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 images `[..., channels]` (single images or
  stacked chunks), in [0, 1] units. Exact: computed from per-channel histograms of the 256 values."""
  histogram = np.zeros((channels, 256), np.int64)
  for image in images:
    pixels = np.asarray(image, np.uint8).reshape(-1, channels)
    for c in range(channels):
      histogram[c] += np.bincount(pixels[:, c], minlength=256)
  count = histogram.sum(axis=1)
  if not count.all():
    raise ValueError("image_statistics needs at least one image")
  values = np.arange(256, dtype=np.float64) / 255.0
  mean = histogram @ values / count
  std = np.sqrt(np.maximum(histogram @ np.square(values) / count - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(max(s, 1e-6)) for s in std)


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
  values = tuple(float(v) for v in values)
  if len(values) == channels:
    return values
  if len(values) == 1:
    return values * channels
  if channels == 1 and len(values) == 3:
    return (sum(values) / 3.0,)
  raise UserError(f"--config.{what} has {len(values)} values for {channels}-channel images: give 1 or {channels}")


def _parse(spec: str, what: str) -> tuple[float, ...] | None:
  spec = spec.strip()
  if spec in PRESETS:
    return PRESETS[spec][0 if what == "image_mean" else 1]
  if spec == "dataset":
    return None
  try:
    values = tuple(float(v) for v in spec.split(","))
  except ValueError:
    values = ()
  if not values or (what == "image_std" and min(values) <= 0):
    raise UserError(
      f"--config.{what}={spec}: expected openai, imagenet, dataset or comma-separated numbers in [0, 1] units"
      + (" (each > 0)" if what == "image_std" else "")
    )
  return values


def normalization(
  mean_spec: str,
  std_spec: str,
  channels: int,
  statistics: Callable[[], tuple[Sequence[float], Sequence[float]]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel, in [0, 1] pixel units, from `--config.image_mean/std` settings.

  Each is a preset (`openai`, `imagenet`), comma-separated numbers, or `dataset`: taken from
  `statistics()` (the training images' (mean, std), e.g. `image_statistics`), which the caller
  stores with its run so that evaluation normalizes exactly as training did.
  """
  mean, std = _parse(mean_spec, "image_mean"), _parse(std_spec, "image_std")
  if mean is None or std is None:
    if statistics is None:
      raise ValueError("normalization 'dataset' needs the training images' statistics")
    data_mean, data_std = statistics()
    mean = data_mean if mean is None else mean
    std = data_std if std is None else std
  return _per_channel(mean, channels, "image_mean"), _per_channel(std, channels, "image_std")


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 `[..., C]` -> float32 `(x / 255 - mean) / std` per channel (works on NumPy and JAX arrays)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) / np.float32(255.0) - mean) / std
