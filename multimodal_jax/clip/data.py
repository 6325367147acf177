"""What a CLIP run reads: the training pairs, the evaluation set, and the image pipeline's pure helpers
(fitting an embedded digit to the run's size, the per-record transform, the normalizer). The config's
auto values are resolved once, in `multimodal_jax.clip.settings` (`ClipSettings`); its `data` part comes in here.

The embedded captioned digits (`dataset=captioned_digits`, the default) keep their own word
tokenizer, MNIST statistics and 32 px single-channel images; any other SPEC (`csv:`, `tfds:`,
`folder:`, `wds:`; `multimodal_jax.data.specs`) is read through `specs.open_dataset`. From `wds:`
shards, training replaces an unusable sample by a usable one and counts it in the batch column
`loop.SKIPPED_KEY` (logged as `skipped_samples`); evaluation leaves unusable samples out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax.arrays import random_shift
from multimodal_jax.data import image_files, specs
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.loop import SKIPPED_KEY

EMBEDDED = ("captioned_digits",)  # the datasets that ship with the package (`datasets.captioned_digits`)


def as_setting(values: Sequence[float]) -> str:
  """Numbers as an `image_mean` / `image_std` setting (comma-separated, exact float repr)."""
  return ",".join(repr(float(v)) for v in values)


def make_normalizer(mean: Sequence[float], std: Sequence[float]) -> Callable[[Any, jax.Array | None, int], jnp.ndarray]:
  """`normalize(images uint8 [b, H, W, C], rng, max_shift) -> float32 [b, H, W, C]`: standardised,
  randomly shifted by up to `max_shift` pixels when `rng` is given (the uncovered border is black)."""
  if len(set(mean)) == 1 and len(set(std)) == 1:  # one value for every channel: scalar arithmetic
    m, s = float(mean[0]), float(std[0])

    def normalize(images, rng=None, max_shift=0):
      x = (jnp.asarray(images, jnp.float32) / 255.0 - m) / s
      return x if rng is None else random_shift(x, rng, max_shift, fill=-m / s)

    return normalize
  m, s = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  def normalize_channels(images, rng=None, max_shift=0):
    x = jnp.asarray(images, jnp.float32)
    if rng is not None:
      x = random_shift(x, rng, max_shift, fill=0.0)
    return (x / 255.0 - m) / s

  return normalize_channels


def fit_image(image: np.ndarray, size: int, chans: int) -> np.ndarray:
  """An embedded digit (uint8 [32, 32, 1]) at the run's size and channels (unchanged when they agree)."""
  if image.shape == (size, size, chans):
    return image
  return image_files.preprocess_array(image[..., 0] if image.shape[-1] == 1 else image, size, chans)


def train_source(config: Any, data_settings: specs.DataSettings) -> tuple[Any, str, specs.Dataset | None]:
  """(random-access training records, their caption key, the opened SPEC or None): the embedded
  digits' train split (records with `caption`) or the SPEC's training split (records with `text`),
  at the run's image size and channels (`data_settings`, a `ClipSettings.data`)."""
  from multimodal_jax.data.pipeline import load_on_every_process

  if config.dataset in EMBEDDED:
    return load_on_every_process(lambda: cd.load(config.data_dir or None))["train"], "caption", None
  data = load_on_every_process(
    lambda: specs.open_dataset(config.dataset, data_settings, need=("image", "text"), resample=True)
  )
  return data.split("train"), "text", data


def make_transform(text_inputs: Callable, size: int, chans: int, caption_key: str = "caption", label: bool = True):
  """record -> `{"image": uint8 [size, size, chans], "text": model text input, ("label")}`, and the count of
  unusable samples the record replaced (`SKIPPED_KEY`, from wds shards), which the loop takes out and logs."""

  def transform(record):
    out = {"image": fit_image(record["image"], size, chans), "text": text_inputs([record[caption_key]])[0]}
    if label:
      out["label"] = record["label"]
    if "skipped" in record:
      out[SKIPPED_KEY] = record["skipped"]
    return out

  return transform


def eval_source(
  config: Any, data_settings: specs.DataSettings
) -> tuple[Any, tuple[str, ...] | None, list[str] | None, tuple[str, ...]]:
  """(records, class names or None, image paths or None, fields) of `--config.eval_dataset`: a
  TFDS dataset's test split (else validation), or every image of a folder / CSV, or every usable sample
  of wds shards (clip_benchmark's layout: KEY.cls class indexes, classnames.txt beside the shards or one
  folder up; the paths are SHARD#KEY), at the run's image size and channels (`data_settings`)."""
  from multimodal_jax.data.pipeline import load_on_every_process

  spec = specs.parse_spec(config.eval_dataset, EMBEDDED, key="eval_dataset")
  data = load_on_every_process(
    lambda: specs.open_dataset(spec, data_settings, need=("image",), want=("label", "text"), resample=False)
  )
  split = "all"
  if spec.kind == "tfds":
    split = next((s for s in ("test", "validation") if s in data.splits), None)
    if split is None:
      raise UserError(
        f"--config.eval_dataset={spec} has no test or validation split (its splits: {sorted(data.splits)})"
      )
  if "label" not in data.fields and "text" not in data.fields:
    raise UserError(
      f"--config.eval_dataset={spec} has neither class labels nor captions: use a folder: of class sub-folders, or a "
      "tfds: dataset with --config.label_key / --config.text_key"
    )
  if spec.kind == "wds":
    return _usable_wds(spec, data)
  return data.split(split), data.class_names, data.paths(split), data.fields


def _usable_wds(spec: specs.Spec, data: specs.Dataset):
  """`eval_source` of wds shards: their usable samples (a placeholder would count as a miss; process 0 finds
  them first, the others read its cache), class names from classnames.txt (zero-shot needs them)."""
  from multimodal_jax.data.pipeline import load_on_every_process

  if data.fields == ("image", "label") and not data.class_names:
    raise UserError(
      f"--config.eval_dataset={spec} has class indexes (.cls) but no classnames.txt beside its shards or one folder "
      "up: add one (one class name a line, in index order)"
    )
  source = load_on_every_process(lambda: data.split("all").usable())
  if source.unusable_samples and jax.process_index() == 0:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(source.unusable_reasons.items()))
    print(f"note: {source.unusable_samples} samples of {spec} cannot be used ({reasons}); evaluated without them")
  return source, data.class_names, source.paths, data.fields
