"""A finished CLIP run's locked text tower as a featuriser of prompts (latent diffusion's condition=clip):
`ClipTokenFeatures.from_workdir(workdir, mesh)` restores the run and gives its token features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from multimodal_jax import checkpoint
from multimodal_jax.clip.build import make_init_params
from multimodal_jax.clip.model import CLIP, ClipConfig
from multimodal_jax.clip.settings import resolve
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.text.featurisers import CachedTextFeatures


class ClipTokenFeatures:
  """A locked CLIP text tower's token features: texts -> (float32 `[n, L, width]`, the sequence after
  `ln_final`, no projection; mask bool `[n, L]`, True up to and including the end-of-text token, see
  `clip.TextTransformer`), computed once per distinct text. `L` is the CLIP run's context length.

  `tokenizer` is the one the CLIP model was trained with (`encode(texts) -> int [n, L]`, `tokenize(text)`
  without start / end tokens). `from_workdir` builds one from a trained CLIP run.
  """

  def __init__(self, config: ClipConfig, params: Any, tokenizer, batch_size: int = 64, step: int | None = None):
    if config.text_tower != "transformer":
      raise ValueError(f"CLIP token features need the transformer text tower, not {config.text_tower!r}")
    self.tokenizer = tokenizer
    self.width = config.text.width
    self.context_length = config.text.context_length
    self.step = step  # the CLIP run's step the params come from (from_workdir), else None
    model = CLIP(config)

    def compute(p, inputs):
      return model.apply({"params": p}, inputs["ids"], method=model.encode_text_tokens)

    def tokenize(texts):
      return {"ids": np.asarray(tokenizer.encode(texts))}

    self._features = CachedTextFeatures(tokenize, compute, params, (np.float32, bool), batch_size)

  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    mesh: jax.sharding.Mesh,
    batch_size: int = 64,
  ) -> ClipTokenFeatures:
    """From the workdir of a finished CLIP run: its saved config, its latest params (the EMA ones
    when the run kept an EMA), sharded for `mesh`. UserError for a run of another kind (`describe_run`) and
    when `workdir` holds no checkpoint."""
    fix = f"train one first with python -m experiments.clip --workdir {workdir or 'DIR'}"
    if not workdir or not checkpoint.saved_steps(workdir):
      raise UserError(f"no CLIP checkpoint in {workdir!r}: {fix}")
    config = ml_collections.ConfigDict(checkpoint.read_config(workdir))
    model_config, tokenizer, init_params = describe_run(config)
    step, params = from_checkpoint.restore_params(workdir, init_params, mesh)
    return cls(model_config, params, tokenizer, batch_size, step)

  def token_count(self, text: str) -> int:
    """Tokens of `text` before truncation, start and end tokens included."""
    return len(self.tokenizer.tokenize(text)) + 2

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return self._features(texts)


def describe_run(config: ml_collections.ConfigDict):
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
  settings = resolve(config)
  tokenizer = settings.text_tokenizer()
  return settings.model, tokenizer, make_init_params(CLIP(settings.model), settings, tokenizer.encode)
