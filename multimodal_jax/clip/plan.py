"""CLIP's steps for `--mode=plan` (`multimodal_jax.planning`): the train step exactly as `run_train`
builds it (model, contrastive loss over the mesh, optimizer, accumulation, EMA, from the config's
`clip.settings.resolve`), on abstract batches of the config's shapes. No data is read: the image
normalization's values do not change the compiled step, so the plan uses a fixed one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from multimodal_jax import planning
from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import weights as clip_weights
from multimodal_jax.clip.build import build
from multimodal_jax.clip.losses import make_loss_fn
from multimodal_jax.clip.settings import resolve


def plan_steps(config: Any, dtype: str) -> Sequence[planning.PlanStep]:
  settings = resolve(config)
  model, text_inputs, init_params = build(settings)
  size, chans = settings.image_size, settings.channels
  text = np.asarray(text_inputs(["a"]))
  normalize = cdata.make_normalizer((0.5,) * chans, (0.5,) * chans)

  def lower(batch: int, mesh):
    shapes = {"image": ((batch, size, size, chans), np.uint8), "text": ((batch, *text.shape[1:]), text.dtype)}
    loss_fn = make_loss_fn(model, config, mesh, normalize)
    return planning.lower_train_step(
      mesh, loss_fn, init_params, shapes, dtype=dtype, section=config, freeze_aliases=clip_weights.FREEZE_ALIASES
    )

  return [planning.PlanStep("train", "batch_size", lower, unit=config.grad_accum_steps)]
