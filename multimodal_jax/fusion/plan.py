"""Fusion's steps for `--mode=plan` (`multimodal_jax.planning`): the train step as `run_train` builds it,
on abstract batches. AV-digits' feature shapes are known; a TFDS dataset's come from its metadata
(`fusion.data.load_data` opens the dataset's description, no record is read)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import planning
from multimodal_jax.data import specs
from multimodal_jax.datasets import av_digits
from multimodal_jax.fusion.data import EMBEDDED, FusionData, load_data, modalities_of
from multimodal_jax.fusion.losses import make_loss_fn
from multimodal_jax.fusion.model import build_model

# AV-digits' features: (shape without the batch, dtype).
AV_DIGITS = {"image": ((28, 28, 1), np.uint8), "audio": ((av_digits.AUDIO_FRAMES, av_digits.MEL_BINS), np.float32)}


def _features(config: Any) -> tuple[dict[str, tuple[tuple[int, ...], Any]], FusionData | None]:
  """Each modality's (shape, dtype) and, for a TFDS dataset, its FusionData (the model's classes and encoders)."""
  if specs.parse_spec(config.dataset, EMBEDDED).kind == "embedded":
    return {m: AV_DIGITS[m] for m in modalities_of(config)}, None
  data = load_data(config)
  example = data.train[0]
  return {m: (data.shapes[m], np.asarray(example[m]).dtype) for m in modalities_of(config)}, data


def plan_steps(config: Any, dtype: str) -> Sequence[planning.PlanStep]:
  features, data = _features(config)
  model = build_model(config, data)

  def init_params(rng):
    example = {m: jnp.zeros((1, *shape), jnp.float32) for m, (shape, _) in features.items()}
    return model.init({"params": rng}, example, train=False)["params"]

  def lower(batch: int, mesh: jax.sharding.Mesh):
    shapes = {m: ((batch, *shape), dt) for m, (shape, dt) in features.items()}
    shapes["label"] = ((batch,), np.int32)
    return planning.lower_train_step(
      mesh, make_loss_fn(model, config), init_params, shapes, dtype=dtype, section=config
    )

  return [planning.PlanStep("train", "batch_size", lower, unit=config.grad_accum_steps)]
