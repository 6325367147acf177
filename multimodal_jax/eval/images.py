"""Image files without an imaging library: PNG writing/reading (8-bit gray or RGB) and image grids."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def to_uint8(image: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
  """Float pixels in [low, high] -> uint8 (clipped); uint8 passes through."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  scaled = (image.astype(np.float64) - low) / (high - low)
  return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"encode_png takes uint8 pixels, got {image.dtype}: convert with to_uint8 first")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    color_type = 0
  elif image.ndim == 3 and image.shape[-1] == 3:
    color_type = 2
  else:
    raise ValueError(f"encode_png takes [H, W], [H, W, 1] or [H, W, 3] pixels, got shape {image.shape}")
  height, width = image.shape[:2]
  rows = image.reshape(height, -1)
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row
  header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def save_png(path: str, image: np.ndarray) -> None:
  with open(path, "wb") as f:
    f.write(encode_png(image))


def decode_png(data: bytes) -> np.ndarray:
  """PNG bytes written by `encode_png` (8-bit gray or RGB, filter type 0) -> uint8 array."""
  if data[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError("not a PNG file")
  pos, idat, header = 8, b"", None
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos : pos + 4])
    kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat += body
    pos += 12 + length
  width, height, depth, color_type = header[:4]
  if depth != 8 or color_type not in (0, 2):
    raise ValueError("decode_png reads 8-bit gray or RGB PNGs only")
  channels = 3 if color_type == 2 else 1
  rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
  if np.any(rows[:, 0]):
    raise ValueError("decode_png reads unfiltered PNGs only (as encode_png writes)")
  pixels = rows[:, 1:].reshape(height, width, channels)
  return pixels[..., 0] if channels == 1 else pixels


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
