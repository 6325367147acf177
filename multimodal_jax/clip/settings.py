"""A CLIP run's config resolved once: `resolve(config)` reads the ml_collections config, fills every empty
(auto) key and builds the run's `ClipConfig`, into the frozen `ClipSettings` that the modes, the model
builder, the loss, the evaluation and the plan read (as `loop.fit` reads its frozen `LoopConfig`). The
caller's config is left as it is; `ClipSettings.recorded(config)` is the copy a training run saves, every
auto key written out, so that its evaluation does not depend on these defaults.

The auto values, in this one place:

  model         tiny; `init_from` (the architecture of the `init_from=open_clip:FILE` weights) when
                the run starts from open_clip weights
  image_tower   resnet; vit when the run starts from open_clip weights (they hold a ViT)
  tokenizer     words for the embedded captions; clip_bpe otherwise (and with open_clip weights)
  context_length  16 for words; else the preset's (77 for every OpenAI-shaped preset and for
                imported weights; 77 for tiny too)
  image_size    the preset's own (tiny 32, ViT-B-32 224, the imported weights')
  channels      1 for the embedded digits, 3 otherwise
  image_mean/std  MNIST's for the embedded digits, OpenAI's otherwise; `dataset`: the training images'
                statistics (`ClipSettings.with_training_images`, once the training data is open)
  templates     the embedded held-out templates for the digits (recorded empty), `openai` otherwise
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import model as clip_model
from multimodal_jax.config import source_needs, source_path
from multimodal_jax.data import image_files, specs
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # MNIST pixel statistics (0-1 scale)
BPE_CONTEXT = 77  # OpenAI CLIP's context length
WORDS_CONTEXT = 16  # the embedded captions' word tokenizer

sources_relation = source_needs("init_from", "minilm", "text_tower", "minilm", "the locked text tower")


def tokenizer_rule(value: str) -> bool:
  """The `tokenizer` key's rule: empty (auto), words, clip_bpe or hf:PATH."""
  return value in ("", "words", "clip_bpe") or (value.startswith("hf:") and len(value) > 3)


def open_clip_file(config: Any) -> str | None:
  """The open_clip checkpoint the run's initial params come from (`init_from=open_clip:FILE`, or a Hub
  name whose snapshot is an open_clip checkpoint), else None."""
  return source_path(config.get("init_from", ""), "open_clip")


@dataclasses.dataclass(frozen=True)
class ClipSettings:
  """Every value of a CLIP run that its config leaves to a default, resolved (see the module docstring)."""

  embedded: bool  # the training pairs are the embedded captioned digits
  open_clip_file: str | None  # the open_clip weights the run starts from (None: its own init)
  minilm_dir: str | None  # text_tower=minilm's sentence-transformers folder (None: the package's copy)
  model_name: str  # a preset of clip.model, or init_from (the open_clip weights' architecture)
  image_tower: str  # vit or resnet
  tokenizer: str  # words, clip_bpe or hf:PATH
  context_length: int
  image_size: int
  channels: int
  templates: str  # the zero-shot templates' setting: openai, a FILE, or empty for the digits' held-out ones
  model: clip_model.ClipConfig  # the run's model: the preset with the towers, sizes and vocabulary above
  data: specs.DataSettings  # what `specs.open_dataset` reads, at the model's image size and channels
  image_mean: tuple[float, ...] | None = None  # None until the training images give image_mean/std=dataset
  image_std: tuple[float, ...] | None = None

  @property
  def from_open_clip(self) -> bool:
    return self.open_clip_file is not None

  def text_tokenizer(self):
    """The run's tokenizer (`encode(texts) -> int32 [n, context]`). The word tokenizer's vocabulary
    is a function of the training templates only, so evaluation rebuilds exactly the same ids."""
    return _tokenizer(self.tokenizer, self.context_length, self.embedded)

  def with_training_images(self, config: Any, train_images: Callable[[], Any]) -> ClipSettings:
    """These settings with `image_mean/std=dataset` computed from `train_images()` (an iterable of uint8
    images or a `specs.Dataset`, called only when a statistic is needed); unchanged when known already."""
    if self.image_mean is not None:
      return self
    mean, std = _normalization(config, self.embedded and not self.from_open_clip, self.channels, train_images)
    return dataclasses.replace(self, image_mean=mean, image_std=std)

  def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel in [0, 1] units."""
    if self.image_mean is None or self.image_std is None:
      raise ValueError("image_mean/std=dataset needs the training images")
    return self.image_mean, self.image_std

  def normalizer(self) -> Callable:
    """`normalize(images uint8, rng, max_shift) -> float32` with the run's mean and std (`data.make_normalizer`)."""
    return cdata.make_normalizer(*self.normalization())

  def recorded(self, config: Any) -> Any:
    """A copy of `config` with the resolved value of every auto key written in, the config a training
    run saves: what it trained with, whatever the defaults become. The embedded digits' templates stay
    empty (their own held-out set), and `model` names `init_from` for imported weights (their architecture
    is the file's). `config` itself is not changed."""
    mean, std = self.normalization()
    out = copy.deepcopy(config)
    out["model"], out["image_tower"], out["tokenizer"] = self.model_name, self.image_tower, self.tokenizer
    out["context_length"], out["image_size"], out["channels"] = self.context_length, self.image_size, self.channels
    out["image_mean"], out["image_std"] = cdata.as_setting(mean), cdata.as_setting(std)
    out["templates"] = self.templates
    return out

  def zero_shot_templates(self, digits: bool) -> tuple[str, ...]:
    """The templates of zero-shot classification on the embedded digits (`digits`) or another eval set:
    `templates`'s (`openai` or a FILE), or when empty the digits' held-out ones (`openai` on another set)."""
    from multimodal_jax.eval.templates import load_templates

    if digits and not self.templates:
      return cd.HELD_OUT_TEMPLATES
    return load_templates(self.templates or "openai")


def resolve(config: Any, train_images: Callable[[], Any] | None = None) -> ClipSettings:
  """The `ClipSettings` of a CLIP config (module docstring), derived once. `image_mean/std=dataset` is
  computed from `train_images()` when given, else left None (`ClipSettings.with_training_images`).
  UserError (one line) for an unknown preset, image tower, loss or a tokenizer that cannot read the data."""
  embedded = config.dataset in cdata.EMBEDDED
  open_clip = open_clip_file(config)
  digits = embedded and open_clip is None  # the digits' own defaults (open_clip weights keep theirs)
  name = config.model or ("init_from" if open_clip is not None else "tiny")
  base = _base_model(name, open_clip)
  tower = config.image_tower or ("vit" if open_clip is not None else "resnet")
  if tower not in ("vit", "resnet"):
    raise UserError(f"image_tower={tower!r}: choose vit or resnet")
  if config.loss not in ("softmax", "sigmoid") or config.loss_impl not in ("gather", "chunked"):
    raise UserError(f"loss={config.loss!r}, loss_impl={config.loss_impl!r}: choose softmax|sigmoid and gather|chunked")
  kind = config.tokenizer or ("words" if digits else "clip_bpe")
  imported = name == "init_from"
  context = config.context_length or (
    WORDS_CONTEXT if kind == "words" else base.text.context_length if imported else BPE_CONTEXT
  )
  size = config.image_size or base.vision.image_size
  chans = config.channels or (1 if digits else 3)
  tokenizer = _tokenizer(kind, context, embedded)
  text = dataclasses.replace(
    base.text, vocab_size=tokenizer.vocab_size, context_length=context, pad_id=tokenizer.pad_id
  )
  sigmoid = config.loss == "sigmoid"
  model = dataclasses.replace(
    base,
    vision=dataclasses.replace(base.vision, tower=tower, image_size=size, channels=chans),
    text=text,
    text_tower="transformer" if config.text_tower == "clip" else "precomputed",
    init_logit_bias=(base.init_logit_bias if imported else -10.0) if sigmoid else None,
    init_logit_scale=float(np.log(10.0)) if sigmoid and not imported else base.init_logit_scale,
    activation=config.activation or base.activation,
    remat=config.remat,
    attention=config.get("attention", "auto"),
  )
  mean, std = _normalization(config, digits, chans, train_images) or (None, None)
  return ClipSettings(  # by what they set: where the run starts, the model, its text, its images
    embedded=embedded,
    open_clip_file=open_clip,
    minilm_dir=source_path(config.get("init_from", ""), "minilm"),
    model_name=name,
    image_tower=tower,
    model=model,
    tokenizer=kind,
    context_length=context,
    templates=config.templates or ("" if embedded else "openai"),
    image_size=size,
    channels=chans,
    data=dataclasses.replace(specs.DataSettings.from_config(config), image_size=size, channels=chans),
    image_mean=mean,
    image_std=std,
  )


def _base_model(name: str, open_clip: str | None) -> clip_model.ClipConfig:
  """The preset `--config.model` names (or the imported weights' architecture)."""
  if name == "init_from":
    if open_clip is None:
      raise UserError("--config.model=init_from takes the architecture of --config.init_from=open_clip:FILE: set it")
    from multimodal_jax.clip import weights as clip_weights

    return clip_weights.open_clip_architecture(open_clip)
  if name not in clip_model.PRESETS:
    raise UserError(f"model={name!r}: choose one of {', '.join(clip_model.PRESETS)} or init_from")
  return clip_model.PRESETS[name]


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


def _normalization(
  config: Any, digits: bool, channels: int, train_images: Callable[[], Any] | None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(mean, std) per channel in [0, 1] units, or None when `dataset` needs the training images and
  `train_images` is None. `digits`: the embedded digits' run (MNIST's statistics by default)."""
  if not config.image_mean and not config.image_std and digits:
    return (MNIST_MEAN,) * channels, (MNIST_STD,) * channels
  mean, std = config.image_mean or "openai", config.image_std or "openai"
  if "dataset" not in (mean, std):
    return image_files.normalization(mean, std, channels)
  if train_images is None:
    return None
  source = train_images()
  if isinstance(source, specs.Dataset):
    return source.normalization(mean, std, channels)
  return image_files.normalization(mean, std, channels, lambda: image_files.image_statistics(source, channels))
