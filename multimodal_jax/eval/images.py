"""PNG files of 8-bit gray or RGB pixels (written and read with Pillow) and image grids."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_uint8(image: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
  """Float pixels in [low, high] -> uint8 (clipped); uint8 passes through."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  scaled = (image.astype(np.float64) - low) / (high - low)
  return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def _pil_image(image: np.ndarray) -> Image.Image:
  """uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` -> a Pillow image of mode L or RGB; ValueError for other
  pixels, so that a float image is never silently truncated."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"encode_png takes uint8 pixels, got {image.dtype}: convert with to_uint8 first")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if not (image.ndim == 2 or image.ndim == 3 and image.shape[-1] == 3):
    raise ValueError(f"encode_png takes [H, W], [H, W, 1] or [H, W, 3] pixels, got shape {image.shape}")
  return Image.fromarray(np.ascontiguousarray(image))


def encode_png(image: np.ndarray) -> bytes:
  """uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` -> PNG bytes (8-bit gray or RGB)."""
  buffer = io.BytesIO()
  _pil_image(image).save(buffer, format="PNG")
  return buffer.getvalue()


def save_png(path: str, image: np.ndarray) -> None:
  """`image` (as `encode_png` takes it) as a PNG file at `path`."""
  _pil_image(image).save(path, format="PNG")


def decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 pixels as Pillow reads them: `[H, W]` for gray, `[H, W, 3]` for RGB."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image)


def grid(images: np.ndarray, columns: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """uint8 `[N, H, W(, C)]` -> one image of `columns` per row, `pad` pixels between them."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  rows = -(-n // columns)
  out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
  return out[..., 0] if c == 1 else out
