"""What a fusion run reads, from its config: the modalities, the train and eval sources, each
modality's shape and the number of classes, and the model's inputs from a batch.

`dataset=av_digits` (embedded) gives images `[28, 28, 1]` uint8 and spectrograms `[T, F]` float32
named by their features (`image`, `audio`). `dataset=tfds:NAME[:CONFIG][@VERSION]` reads a prepared
TFDS dataset without its code: each modality `NAME:FEATURE_KEY` of `modalities` takes a fixed-size
numeric feature of rank at most 3, and the classes come from the ClassLabel `label_key`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from multimodal_jax.config import Rule
from multimodal_jax.data import specs, tfds_source
from multimodal_jax.data.pipeline import load_on_every_process
from multimodal_jax.datasets import av_digits
from multimodal_jax.errors import UserError

MODALITIES = ("audio", "image")  # AV-digits' modalities
EMBEDDED = ("av_digits",)
NUM_CLASSES = 10  # AV-digits' digits


def _modalities_ok(text: str) -> bool:
  entries = [e.strip() for e in text.split(",")]
  names = [e.partition(":")[0].strip() for e in entries]
  keys = [e.partition(":")[2].strip() if ":" in e else n for e, n in zip(entries, names, strict=True)]
  return all(names) and all(keys) and len(set(names)) == len(names)


MODALITIES_RULE = Rule(_modalities_ok, "a comma list of NAME or NAME:FEATURE_KEY, each NAME once")


def modality_keys(config) -> dict[str, str]:
  """{modality name: feature key} in sorted-name order, from `modalities` (NAME or NAME:FEATURE_KEY)."""
  pairs = {}
  for entry in config.modalities.split(","):
    name, sep, key = (part.strip() for part in entry.partition(":"))
    if name:
      pairs[name] = key if sep else name
  return dict(sorted(pairs.items()))


def modalities_of(config) -> tuple[str, ...]:
  """The modality names of `config`, sorted (the order fusion visits them in)."""
  return tuple(modality_keys(config))


def modalities_relation(config) -> None:
  """AV-digits' modalities are named by their features (image, audio): a one-line error otherwise."""
  if specs.parse_spec(config.dataset, EMBEDDED).kind != "embedded":
    return
  pairs = modality_keys(config)
  if not pairs or any(name not in MODALITIES or key != name for name, key in pairs.items()):
    raise UserError(
      f"--config.modalities={config.modalities}: {config.dataset} has the modalities {', '.join(MODALITIES)} "
      "(choose a comma list of them)"
    )


@dataclasses.dataclass(frozen=True)
class FusionData:
  """The train and eval sources (records {modality: array, "label": int64}), each modality's shape
  without the batch, the number of classes, and whether encoders follow the features' ranks."""

  train: Any
  test: Any
  shapes: dict[str, tuple[int, ...]]
  num_classes: int
  by_rank: bool


def _load_av_digits(config) -> FusionData:
  data = load_on_every_process(lambda: av_digits.load(config.data_dir or None))
  shapes = {"image": (28, 28, 1), "audio": (av_digits.AUDIO_FRAMES, av_digits.MEL_BINS)}
  return FusionData(data["train"], data["test"], shapes, NUM_CLASSES, by_rank=False)


def _load_tfds(config, spec) -> FusionData:
  data = tfds_source.open_tfds(spec.name, config.data_dir or tfds_source.default_data_dir(), spec.config, spec.version)
  num_classes = len(data.class_names(config.label_key))
  fields, shapes = {}, {}
  for name, key in modality_keys(config).items():
    feature = data.feature(key, "modalities")
    dtype = np.dtype(getattr(feature, "np_dtype", object))
    shape = tuple(feature.shape)
    if dtype.kind not in "biuf":
      raise UserError(f"{data.spec}: the feature {key!r} is not numeric ({feature!r}): fusion takes arrays and images")
    if None in shape or -1 in shape or len(shape) > 3:
      raise UserError(
        f"{data.spec}: the feature {key!r} has shape {shape}: fusion takes fixed-size scalars, vectors, [T, F] "
        "sequences or [H, W, C] images"
      )
    fields[name], shapes[name] = (key, tfds_source.as_array), shape
  fields["label"] = (config.label_key, tfds_source.as_label)
  train, test = (tfds_source.FeatureSource(data.split(s), fields) for s in (config.train_split, config.eval_split))
  return FusionData(train, test, shapes, num_classes, by_rank=True)


def load_data(config) -> FusionData:
  """The data of `config.dataset` (AV-digits, or a TFDS dataset from `config.data_dir`) for its
  modalities; UserError naming the key to change when the dataset does not fit."""
  spec = specs.parse_spec(config.dataset, EMBEDDED)
  return _load_av_digits(config) if spec.kind == "embedded" else _load_tfds(config, spec)


def model_inputs(batch, modalities, zeroed: tuple[str, ...] = (), dtype=jnp.float32) -> dict:
  """The model's inputs from a batch, in `dtype` (the step's compute dtype: float32 inputs would promote a
  bfloat16 step to float32): uint8 features (images) scaled to [0, 1]; `zeroed` modalities set to 0."""
  inputs = {}
  for m in modalities:
    x = batch[m].astype(jnp.float32)
    if batch[m].dtype == jnp.uint8:
      x = x / 255.0
    x = x.astype(dtype)
    inputs[m] = jnp.zeros_like(x) if m in zeroed else x
  return inputs
