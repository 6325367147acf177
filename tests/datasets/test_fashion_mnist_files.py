"""scripts/prepare_fashion_mnist.py: Fashion-MNIST's IDX files written as a user's own files, read back
through the csv: and folder: dataset specs."""

import os

import numpy as np
import pytest
from PIL import Image

from multimodal_jax.data import specs
from scripts import prepare_fashion_mnist as fm

pytestmark = pytest.mark.skipif(
  not os.path.isdir(fm.SOURCE), reason="needs Debian's dataset-fashion-mnist (scripts/install_debian_packages.sh)"
)


def test_files_read_back_as_the_idx_pixels(tmp_path):
  fm.prepare(str(tmp_path), train=60, test=30, mixed=True, seed=1)
  settings = specs.DataSettings(image_size=28, channels=1, data_dir=str(tmp_path / "cache"))
  train = specs.open_dataset(f"csv:{tmp_path}/train.tsv", settings, need=("image", "text")).split("train")
  assert len(train) == 60
  captions = [train[i]["text"] for i in range(len(train))]
  assert all(any(name in c for name in fm.CLASSES) for c in captions)
  assert not any(t.format(n) in captions for t in fm.HELDOUT_TEMPLATES for n in fm.CLASSES)
  modes = {Image.open(os.path.join(tmp_path, "train", f)).mode for f in os.listdir(tmp_path / "train")}
  assert len(modes) >= 4  # PNG of several modes, and JPEG
  test = specs.open_dataset(f"folder:{tmp_path}/test", settings, need=("image", "label"))
  assert test.class_names == tuple(sorted(fm.CLASSES))
  split, paths = test.split("test"), test.paths("test")
  images, labels = fm.load_split(fm.SOURCE, "test")
  assert len(split) == len(paths) == 30
  errors = []
  for i in range(len(split)):
    source = int(os.path.basename(paths[i]).split(".")[0])  # files are named by their IDX index
    record = split[i]
    assert test.class_names[record["label"]] == fm.CLASSES[labels[source]]
    errors.append(np.abs(record["image"][..., 0].astype(int) - images[source]).mean())
  # back at 28 px from a 28-64 px PNG/JPEG: the IDX pixels up to JPEG and resampling (mean error ~5 of
  # 255; against another image of the set it is ~17 or more)
  assert np.mean(errors) < 8 and max(errors) < 14
