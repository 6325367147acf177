"""The images latent diffusion trains and evaluates on, from the embedded captioned digits or from a
user's `--config.dataset=SPEC` (`multimodal_jax.data.specs`): `ImageSet`.

An `ImageSet` holds the distinct training images (uint8 `[n, size, size, channels]`) and their labels
(-1 where the dataset has none), the caption records on them (`captions`, `index`: each record's
image row), the held-out test images and labels, and the class names. Captions come from the data
(the digits' captions, a CSV's caption column, a TFDS text feature) or, for a dataset with labels
only (class folders, a TFDS `ClassLabel`), from prompt templates with the class name in place of
`{}` (`--config.templates`: default `a photo of a {}`, `openai` or a FILE of one template per line):
one caption record per image and template.

Held-out images: the digits' and a TFDS dataset's `test` split; for a CSV, a class folder, webdataset
shards or a TFDS dataset without a `test` split, every tenth record (index 9, 19, ...), kept out of
training. Webdataset shards (`wds:PATTERN`) are read once into memory, as the other sources are; a
sample that cannot be used (an undecodable image) is left out, and their count printed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from multimodal_jax.data import specs
from multimodal_jax.data.pipeline import load_on_every_process
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion.pipeline import split_arrays, unique_images

EMBEDDED = "captioned_digits"
DEFAULT_TEMPLATE = "a photo of a {}"
HOLDOUT_EVERY = 10  # CSV / folder / TFDS without a test split: record i is held out when i % 10 == 9
UNLABELLED_EVAL_PROMPTS = 10  # CSV: eval_samples_per_digit x this many test captions


@dataclasses.dataclass
class ImageSet:
  """Training and test images of one dataset, with the captions and class names prompts come from."""

  name: str
  images: np.ndarray  # uint8 [n, size, size, channels], distinct training images
  labels: np.ndarray  # int64 [n], -1 without labels
  captions: list[str]  # one per caption record
  index: np.ndarray  # int [records]: the image row of each caption record
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...] | None
  templates: tuple[str, ...] = ()

  @property
  def embedded(self) -> bool:
    return self.name == EMBEDDED

  @property
  def num_classes(self) -> int:
    return len(self.class_names) if self.class_names else 0

  def limited(self, limit: int) -> ImageSet:
    """The first `limit` distinct training images and the caption records on them (0: all)."""
    if not limit:
      return self
    if not 0 < limit <= len(self.images):
      raise UserError(f"train_images={limit}: choose 1 to {len(self.images)} (0: all)")
    keep = np.flatnonzero(self.index < limit)
    return dataclasses.replace(
      self, images=self.images[:limit], labels=self.labels[:limit], captions=[self.captions[i] for i in keep],
      index=self.index[keep],
    )  # fmt: skip

  def training_texts(self) -> list[str]:
    """The corpus a word-level prompt vocabulary is built from."""
    return cd.training_texts() if self.embedded else sorted(set(self.captions))

  def label_of(self, prompt: str) -> int:
    """The class a prompt names: the digits' rule (UserError when it names none); else the longest class
    name found in it as whole words, -1 when it names none or the dataset has no classes."""
    if self.embedded:
      return cd.prompt_digit(prompt)
    text = f" {_words(prompt)} "
    found = [(len(name), i) for i, name in enumerate(self.class_names or ()) if f" {_words(name)} " in text]
    return max(found)[1] if found else -1

  def eval_prompts(self, per_class: int) -> tuple[list[str], np.ndarray]:
    """Evaluation prompts and the labels they ask for (-1 without labels): the digits' held-out
    templates; per class, the templates cycled over; for a dataset without classes the test captions
    (`per_class * UNLABELLED_EVAL_PROMPTS` of them, cycled)."""
    if self.embedded:
      return cd.held_out_prompts(per_class)
    if self.class_names:
      texts = [
        self.templates[k % len(self.templates)].format(name) for name in self.class_names for k in range(per_class)
      ]
      return texts, np.repeat(np.arange(self.num_classes), per_class)
    pool = self.test_captions or self.captions
    count = per_class * UNLABELLED_EVAL_PROMPTS
    return [pool[k % len(pool)] for k in range(count)], np.full(count, -1, np.int64)

  test_captions: list[str] = dataclasses.field(default_factory=list)


def digit_names() -> ImageSet:
  """The embedded digits' prompt side alone (class names, caption corpus, `label_of`), with no images:
  what building the prompts needs, without loading the data."""
  empty = np.zeros((0, 32, 32, 1), np.uint8)
  none = np.zeros(0, np.int64)
  return ImageSet(EMBEDDED, empty, none, [], none, empty, none, tuple(cd.CLASS_NAMES))


def load_image_set(config) -> ImageSet:
  """The `ImageSet` of `config.dataset` (keys: data_dir, image_size, channels, templates and the data
  settings of `multimodal_jax.data.specs`)."""
  spec = specs.parse_spec(config.dataset, (EMBEDDED,))
  if spec.kind == "embedded":
    if config.image_size != 32 or config.channels != 1:
      raise UserError(
        f"{EMBEDDED} images are 32x32 grey: drop --config.image_size / --config.channels, or train on your own "
        "images with --config.dataset=csv:PATH|folder:DIR|tfds:NAME"
      )
    return load_on_every_process(lambda: _digits(config.data_dir or None))
  templates = _templates(config.templates)
  settings = specs.DataSettings.from_config(config)
  dataset = load_on_every_process(lambda: specs.open_dataset(spec, settings, want=("text", "label"), resample=False))
  if "text" not in dataset.fields and "label" not in dataset.fields:
    raise UserError(
      f"{spec} has neither captions nor class labels to prompt with: set --config.text_key or --config.label_key "
      "to one of its features"
    )
  if "text" not in dataset.fields and not dataset.class_names:
    fix = "add a classnames.txt (one name a line) beside its shards" if spec.kind == "wds" else "set --config.text_key"
    raise UserError(f"{spec} has class labels but no class names to prompt with: {fix}")
  if spec.kind == "tfds" and "test" in dataset.splits:
    train, test = _records(dataset.split("train"), dataset.fields), _records(dataset.split("test"), dataset.fields)
  else:
    records = _records(dataset.split("train"), dataset.fields, str(spec))
    held = np.arange(len(records["image"])) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    train = {k: [v for v, h in zip(vs, held) if not h] for k, vs in records.items()}
    test = {k: [v for v, h in zip(vs, held) if h] for k, vs in records.items()}
  if len(train["image"]) < 2 or len(test["image"]) < 2:
    raise UserError(f"{spec} holds too few images ({len(train['image']) + len(test['image'])}): give at least 20")
  images = np.stack(train["image"])
  labels = np.asarray(train["label"], np.int64) if "label" in train else np.full(len(images), -1, np.int64)
  uniq, uniq_labels, index = unique_images(images, labels)
  class_names = tuple(dataset.class_names) if dataset.class_names else None
  if "text" in train:
    captions, rows = list(train["text"]), index
  else:
    captions = [t.format(class_names[label]) for label in labels for t in templates]
    rows = np.repeat(index, len(templates))
  test_labels = np.asarray(test["label"], np.int64) if "label" in test else np.full(len(test["image"]), -1, np.int64)
  return ImageSet(
    name=str(spec), images=uniq, labels=uniq_labels, captions=captions, index=rows,
    test_images=np.stack(test["image"]), test_labels=test_labels, class_names=class_names, templates=templates,
    test_captions=list(test.get("text", [])),
  )  # fmt: skip


# The decoded embedded digits of the last prepared directory read in this process, by its files' signature
# (`cd.prepared_signature`: rebuilt data is read again). A run reads them at each stage, in the sampler and in
# the evaluator; decoding the 9,000 records took ~2 s each time.
_DECODED_DIGITS: dict[tuple, ImageSet] = {}


def _digits(data_dir: str | None) -> ImageSet:
  data = cd.load(data_dir)
  key = cd.prepared_signature(data_dir)
  if key not in _DECODED_DIGITS:
    images, captions, labels = split_arrays(data["train"])
    uniq, uniq_labels, index = unique_images(images, labels)
    test_images, test_captions, test_labels = split_arrays(data["test"])
    for array in (uniq, uniq_labels, index, test_images, test_labels):
      array.flags.writeable = False  # shared by every caller in the process
    _DECODED_DIGITS.clear()
    _DECODED_DIGITS[key] = ImageSet(
      name=EMBEDDED, images=uniq, labels=uniq_labels, captions=captions, index=index, test_images=test_images,
      test_labels=test_labels, class_names=tuple(cd.CLASS_NAMES), test_captions=test_captions,
    )  # fmt: skip
  shared = _DECODED_DIGITS[key]
  # each caller gets lists of its own; the arrays are read-only
  return dataclasses.replace(shared, captions=list(shared.captions), test_captions=list(shared.test_captions))


def _words(text: str) -> str:
  return " ".join(re.findall(r"\w+", text.lower()))


def _records(source, fields, name: str = "") -> dict[str, list]:
  """Every usable record of `source` as `{field: [values]}` (a wds placeholder, `valid=False`, left out)."""
  records = [source[i] for i in range(len(source))]
  usable = [r for r in records if r.get("valid", True)]
  if len(usable) < len(records):
    print(f"note: {len(records) - len(usable)} samples of {name} cannot be used and are left out", flush=True)
  return {key: [r[key] for r in usable] for key in fields}


def _templates(spec: str) -> tuple[str, ...]:
  if not spec:
    return (DEFAULT_TEMPLATE,)
  from multimodal_jax.eval.templates import load_templates

  return load_templates(spec)
