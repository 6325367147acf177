"""AVDCNN's steps for `--mode=plan` (`multimodal_jax.planning`): the train step as `run_train` builds it
(the model of the config, its loss, the optimizer, the population batch-norm statistics in the state),
on abstract batches of frames: noisy log-power context `[b, bins, context]`, uint8 mouth images
`[b, context, 16, 24, 3]`, the clean centre frame and the utterance statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import planning
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.avdcnn.config import model_config
from multimodal_jax.avdcnn.losses import make_loss_fn


def plan_steps(config: Any, dtype: str) -> Sequence[planning.PlanStep]:
  model = avdcnn.AVDCNN(model_config(config))
  cfg = model.config

  def lower(batch: int, mesh):
    shapes = {
      "audio": ((batch, cfg.bins, cfg.context), np.float32),
      "lips": ((batch, cfg.context, *avdcnn.LIPS_SHAPE), np.uint8),
      "target": ((batch, cfg.bins), np.float32),
      "mean": ((batch, cfg.bins), np.float32),
      "std": ((batch, cfg.bins), np.float32),
    }
    loss_fn = make_loss_fn(model, config.mu, config.under_weight, config.loss, config.remat)
    stats = lambda params: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), avdcnn.batch_stats_shapes(model))
    init = avdcnn.make_init_params(model)
    return planning.lower_train_step(mesh, loss_fn, init, shapes, dtype=dtype, section=config, model_state_fn=stats)

  return [planning.PlanStep("train", "batch_size", lower, unit=config.grad_accum_steps)]
