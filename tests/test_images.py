"""PNG writing: our encoder's files decode (with PIL where installed, else our decoder) to the same pixels."""

import io

import numpy as np
import pytest

from multimodal_jax.eval import images


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (4, 6, 3)])
def test_png_round_trip(shape):
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  data = images.encode_png(pixels)
  expected = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
  np.testing.assert_array_equal(images.decode_png(data), expected)
  pil = pytest.importorskip("PIL.Image")
  np.testing.assert_array_equal(np.asarray(pil.open(io.BytesIO(data))), expected)


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
