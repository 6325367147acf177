"""Image decoding with Pillow: every common mode to 1 or 3 channels, open_clip's resize and centre crop,
unreadable files, normalization presets and dataset statistics."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal_jax.data import image_files
from multimodal_jax.errors import UserError

RGB = (200, 100, 50)
LUMA = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)  # Pillow's ITU-R 601 conversion: 124


def _save(tmp_path, image, name):
  path = tmp_path / name
  image.save(path)
  return str(path)


def _solid_images(tmp_path):
  """The same colour in each mode Pillow writes, with what it must decode to (RGB pixels)."""
  rgb = Image.new("RGB", (20, 20), RGB)
  gray = Image.new("L", (20, 20), 77)
  return {
    "L": (_save(tmp_path, gray, "l.png"), (77, 77, 77)),
    "LA": (_save(tmp_path, Image.merge("LA", [gray, Image.new("L", (20, 20), 0)]), "la.png"), (77, 77, 77)),
    "RGB": (_save(tmp_path, rgb, "rgb.png"), RGB),
    "RGBA": (_save(tmp_path, Image.new("RGBA", (20, 20), (*RGB, 0)), "rgba.png"), RGB),  # alpha dropped
    "P": (_save(tmp_path, rgb.quantize(colors=4), "p.png"), RGB),
    "I;16": (_save(tmp_path, Image.fromarray(np.full((20, 20), 200 * 257, np.uint16)), "i16.png"), (200, 200, 200)),
    "1": (_save(tmp_path, Image.new("1", (20, 20), 1), "bilevel.png"), (255, 255, 255)),
    "BMP": (_save(tmp_path, rgb, "rgb.bmp"), RGB),
  }


def test_every_png_mode_decodes_to_rgb_and_gray(tmp_path):
  for mode, (path, expected) in _solid_images(tmp_path).items():
    with Image.open(path) as image:
      assert mode in ("BMP", image.mode), f"{mode} was saved as {image.mode}"
    rgb = image_files.load_image(path, 8, 3)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3), mode
    np.testing.assert_array_equal(rgb, np.broadcast_to(expected, (8, 8, 3)), err_msg=mode)
    gray = image_files.load_image(path, 8, 1)
    assert gray.shape == (8, 8, 1), mode
    luma = round(expected[0] * 0.299 + expected[1] * 0.587 + expected[2] * 0.114)
    assert abs(int(gray[0, 0, 0]) - luma) <= 1, mode
  assert abs(int(image_files.load_image(_solid_images(tmp_path)["RGB"][0], 8, 1)[0, 0, 0]) - LUMA) <= 1


def test_sixteen_bit_gray_keeps_its_range(tmp_path):
  ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
  path = _save(tmp_path, Image.fromarray(ramp), "ramp16.png")
  np.testing.assert_array_equal(image_files.load_image(path, 16, 1)[..., 0], np.arange(256).reshape(16, 16))


def test_jpeg_and_bytes_decode(tmp_path):
  path = _save(tmp_path, Image.new("RGB", (40, 30), RGB), "photo.jpg")
  pixels = image_files.load_image(path, 16, 3)
  assert np.abs(pixels.astype(int) - RGB).max() <= 3  # JPEG is lossy
  with open(path, "rb") as f:
    np.testing.assert_array_equal(image_files.load_image(f.read(), 16, 3), pixels)


@pytest.mark.parametrize("width, height", [(64, 32), (32, 64), (30, 45), (45, 30), (16, 16), (7, 9)])
def test_shorter_side_resized_bicubic_then_centre_crop(width, height):
  rng = np.random.default_rng(width * height)
  image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  size = 16
  out = image_files.resize_and_crop(image, size)
  assert out.size == (size, size)
  # torchvision's Resize(size) on the shorter side (the longer truncated to int), then CenterCrop(size).
  if width <= height:
    scaled = (size, int(size * height / width))
  else:
    scaled = (int(size * width / height), size)
  reference = image.resize(scaled, Image.Resampling.BICUBIC) if scaled != (width, height) else image
  left, top = round((scaled[0] - size) / 2), round((scaled[1] - size) / 2)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(reference)[top : top + size, left : left + size])


def test_centre_crop_keeps_the_middle_of_a_wide_image():
  stripes = np.zeros((10, 30), np.uint8)
  stripes[:, 10:20] = 255  # the middle third is white
  out = image_files.resize_and_crop(Image.fromarray(stripes), 10)
  np.testing.assert_array_equal(np.asarray(out), np.full((10, 10), 255))


def test_unreadable_files_raise_unreadable_image(tmp_path):
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"this is not an image")
  good = _save(tmp_path, Image.new("RGB", (64, 64), RGB), "good.png")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(Path(good).read_bytes()[:60])
  for path in (garbage, truncated, tmp_path / "missing.png"):
    with pytest.raises(image_files.UnreadableImage) as info:
      image_files.load_image(str(path), 8, 3)
    assert "\n" not in str(info.value) and str(info.value)


def test_preprocess_array_converts_decoded_pixels():
  rgba = np.zeros((12, 24, 4), np.uint8)
  rgba[..., :3] = RGB
  np.testing.assert_array_equal(image_files.preprocess_array(rgba, 6, 3), np.broadcast_to(RGB, (6, 6, 3)))
  sixteen = np.full((8, 8), 100 * 257, np.uint16)
  np.testing.assert_array_equal(image_files.preprocess_array(sixteen, 4, 1), np.full((4, 4, 1), 100))
  same = np.zeros((4, 4, 1), np.uint8)
  assert image_files.preprocess_array(same, 4, 1) is same


def test_normalization_presets_numbers_and_dataset():
  mean, std = image_files.normalization("openai", "openai", 3)
  assert mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and std[0] == pytest.approx(0.26862954)
  mean, std = image_files.normalization("imagenet", "imagenet", 1)  # averaged to one channel
  assert mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,)) and len(std) == 1
  assert image_files.normalization("0.5", "0.25", 3) == ((0.5,) * 3, (0.25,) * 3)
  stats = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
  assert image_files.normalization("dataset", "dataset", 3, lambda: stats) == stats
  assert image_files.normalization("dataset", "imagenet", 3, lambda: stats)[1] == (0.229, 0.224, 0.225)
  for mean, std, message in [("purple", "openai", "--config.image_mean=purple"), ("openai", "0", "each > 0")]:
    with pytest.raises(UserError, match=message):
      image_files.normalization(mean, std, 3)
  with pytest.raises(UserError, match="2 values for 3-channel"):
    image_files.normalization("0.5,0.5", "openai", 3)


def test_image_statistics_are_exact():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  mean, std = image_files.image_statistics([images[:2], images[2], images[3:]], 3)
  pixels = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-12)
  np.testing.assert_allclose(std, pixels.std(0), atol=1e-9)


def test_normalize_matches_the_formula():
  images = np.array([[[0, 255, 51]]], np.uint8)
  out = image_files.normalize(images, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
  np.testing.assert_allclose(out, [[[-1.0, 2.0, 0.0]]], atol=1e-6)
  assert out.dtype == np.float32
