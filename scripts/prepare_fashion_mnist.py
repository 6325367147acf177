"""Fashion-MNIST as a user's own files: an image-caption CSV to train on and a class-folder test set.

  apt-get install -y dataset-fashion-mnist        # the IDX files, installed offline (MIT licence)
  python scripts/prepare_fashion_mnist.py OUT      # OUT/train.tsv + OUT/train/, OUT/test/<class>/, templates

What it writes, from the Debian package's IDX files (`--source`, default its install folder):
- `OUT/train.tsv`: open_clip's CSV convention (tab-separated, header `filepath<TAB>title`, paths
  relative to the CSV), `--train` images (default 20,000) from the training split, each with one
  caption made from its class name and one of `TRAIN_TEMPLATES` drawn at random.
- `OUT/test/<class name>/NNNNN.EXT`: `--test` images (default all 10,000) of the test split in one
  folder per class, for `--config.eval_dataset=folder:OUT/test`.
- `OUT/templates_train.txt` and `OUT/templates_heldout.txt` (one template with `{}` per line); the
  held-out ones never appear in a caption, so zero-shot evaluation with them measures whether the
  model learned the class names rather than the captions' wording.

So that the files look like data from the wild rather than one uniform format, with `--mixed` (the
default) every image is stored in a mode and size drawn at random: PNG in L, LA, RGB, RGBA, P
(palette) or 16-bit I;16, or JPEG (grey or colour, quality 90), upscaled (bicubic) from 28 px to a
side between 28 and 64 px. `--no-mixed` writes every image as a 28 px grey PNG. The draw is seeded
(`--seed`), so the same command writes the same files.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np
from PIL import Image

SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TRAIN_TEMPLATES = (
  "a photo of a {}.",
  "a {}.",
  "a picture of a {}.",
  "a grayscale photo of a {}.",
  "a product photo of a {}.",
  "a small photo of a {}.",
  "a {} on a plain background.",
  "a low resolution photo of a {}.",
)
HELDOUT_TEMPLATES = ("a close-up photo of the {}.", "a catalogue image of a {}.", "this is a {}.")
_KINDS = ("L", "LA", "RGB", "RGBA", "P", "I;16", "jpeg-L", "jpeg-RGB")


def read_idx(path: str) -> np.ndarray:
  """An IDX file (the MNIST format: big-endian header of magic, dimension sizes) as a uint8 array."""
  with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  if magic >> 8 != 0x08:  # 0x08: unsigned bytes
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(magic & 0xFF)]
  start = 4 + 4 * len(dims)
  return np.frombuffer(data, np.uint8, count=int(np.prod(dims)), offset=start).reshape(dims)


def load_split(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  prefix = "train" if split == "train" else "t10k"
  paths = [os.path.join(source, f"{prefix}-{kind}-idx{n}-ubyte.gz") for kind, n in (("images", 3), ("labels", 1))]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise SystemExit(f"error: {missing[0]} not found: install Debian's dataset-fashion-mnist or pass --source DIR")
  return read_idx(paths[0]), read_idx(paths[1])


def write_image(pixels: np.ndarray, path_stem: str, rng: np.random.Generator | None) -> str:
  """Writes a 28x28 grey image as `path_stem.png|.jpg`, in a random mode and size when `rng` is given."""
  image = Image.fromarray(pixels)
  if rng is None:
    image.save(path_stem + ".png")
    return path_stem + ".png"
  side = int(rng.integers(28, 65))
  if side != 28:
    image = image.resize((side, side), Image.BICUBIC)
  kind = _KINDS[int(rng.integers(len(_KINDS)))]
  if kind.startswith("jpeg"):
    image.convert(kind[5:]).save(path_stem + ".jpg", quality=90)
    return path_stem + ".jpg"
  if kind == "I;16":
    image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
  elif kind == "P":
    image = image.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=256)
  elif kind != "L":
    image = image.convert(kind)
  image.save(path_stem + ".png")
  return path_stem + ".png"


def prepare(out: str, source: str = SOURCE, train: int = 20_000, test: int = 10_000, mixed: bool = True, seed: int = 0):
  """Writes the files described in the module docstring; returns (training rows, test images)."""
  rng = np.random.default_rng(seed)
  style = rng if mixed else None
  images, labels = load_split(source, "train")
  if not 0 < train <= len(images):
    raise SystemExit(f"error: --train must be between 1 and {len(images)}, got {train}")
  os.makedirs(os.path.join(out, "train"), exist_ok=True)
  rows = ["filepath\ttitle"]
  for i in rng.permutation(len(images))[:train]:
    template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
    path = write_image(images[i], os.path.join(out, "train", f"{i:05d}"), style)
    rows.append(f"{os.path.relpath(path, out)}\t{template.format(CLASSES[labels[i]])}")
  with open(os.path.join(out, "train.tsv"), "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")
  images, labels = load_split(source, "test")
  if not 0 < test <= len(images):
    raise SystemExit(f"error: --test must be between 1 and {len(images)}, got {test}")
  for name in CLASSES:
    os.makedirs(os.path.join(out, "test", name), exist_ok=True)
  for i in range(test):
    write_image(images[i], os.path.join(out, "test", CLASSES[labels[i]], f"{i:05d}"), style)
  for name, templates in (("templates_train.txt", TRAIN_TEMPLATES), ("templates_heldout.txt", HELDOUT_TEMPLATES)):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      f.write("\n".join(templates) + "\n")
  return train, test


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", help="folder to write (created)")
  parser.add_argument("--source", default=SOURCE, help="folder of the IDX .gz files")
  parser.add_argument("--train", type=int, default=20_000, help="training images (of 60,000)")
  parser.add_argument("--test", type=int, default=10_000, help="test images (of 10,000)")
  parser.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True, help="random modes and sizes")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  train, test = prepare(args.out, args.source, args.train, args.test, args.mixed, args.seed)
  print(f"wrote {train} captioned training images to {os.path.join(args.out, 'train.tsv')} and {test} test images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
