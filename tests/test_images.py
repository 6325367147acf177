"""PNG writing with Pillow: the files decode (with Pillow) to exactly the pixels written; image grids."""

import io

import numpy as np
import pytest
from PIL import Image

from multimodal_jax.eval import images


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (4, 6, 3), (1, 1), (33, 17, 3)])
def test_png_round_trip(shape, tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  expected = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
  with Image.open(io.BytesIO(images.encode_png(pixels))) as image:
    assert image.mode == ("RGB" if expected.ndim == 3 else "L")
    np.testing.assert_array_equal(np.asarray(image), expected)
  images.save_png(str(tmp_path / "a.png"), pixels)
  with Image.open(tmp_path / "a.png") as image:
    np.testing.assert_array_equal(np.asarray(image), expected)
  np.testing.assert_array_equal(images.decode_png((tmp_path / "a.png").read_bytes()), expected)


def test_float_grid_written_as_png_keeps_its_pixels(tmp_path):
  """What the samplers write: float pictures in [-1, 1] -> uint8 -> grid -> PNG, strided views included."""
  pictures = np.random.default_rng(1).uniform(-1.2, 1.2, (5, 8, 8, 3)).astype(np.float32)
  pixels = images.grid(images.to_uint8(pictures, -1.0, 1.0), columns=3)
  images.save_png(str(tmp_path / "grid.png"), pixels[::2, ::-1])  # a non-contiguous view
  with Image.open(tmp_path / "grid.png") as image:
    np.testing.assert_array_equal(np.asarray(image), pixels[::2, ::-1])


def test_grid_places_images_in_rows():
  tiles = np.stack([np.full((2, 3), i, np.uint8) for i in range(5)])
  out = images.grid(tiles, columns=2, pad=1, pad_value=255)
  assert out.shape == (3 * 3 + 1, 2 * 4 + 1)
  assert out[1, 1] == 0 and out[1, 5] == 1 and out[4, 1] == 2 and out[7, 1] == 4 and out[7, 5] == 255


def test_bad_pixels_are_refused():
  with pytest.raises(ValueError, match="uint8"):
    images.encode_png(np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match="shape"):
    images.encode_png(np.zeros((2, 2, 4), np.uint8))
