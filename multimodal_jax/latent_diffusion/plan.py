"""Latent diffusion's steps for `--mode=plan` (`multimodal_jax.planning`): stage 1's autoencoder train
step and stage 2's denoiser train step, each as `stages.train_autoencoder` / `train_denoiser` build them,
on abstract batches (uint8 images; latent posteriors and prompt indices). The prompt table is built
from the training captions as in training (the word vocabulary and the number of distinct prompts
shape the denoiser), so this reads the captions but no image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from multimodal_jax import planning
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion import pipeline as ldm
from multimodal_jax.latent_diffusion import stages
from multimodal_jax.latent_diffusion.data import load_image_set
from multimodal_jax.latent_diffusion.prompts import make_prompts


def plan_steps(config: Any, dtype: str) -> Sequence[planning.PlanStep]:
  if config.condition == "clip":
    raise UserError("--mode=plan with condition=clip is not supported yet: plan with condition=text (same DiT)")
  if config.autoencoder_from:
    raise UserError("--mode=plan with autoencoder_from: plan the default autoencoder (drop autoencoder_from)")
  ae = stages.autoencoder_model(config, dtype)
  size, chans = config.image_size, config.channels
  side = stages.latent_side(config, ae)
  latent = (side, side, ae.config.latent_channels)

  def lower_autoencoder(batch: int, mesh):
    loss_fn = stages.autoencoder_loss_fn(ae, config.autoencoder.kl_weight)
    shapes = {"image": ((batch, size, size, chans), np.uint8)}
    init = stages.autoencoder_init(ae, size)
    return planning.lower_train_step(mesh, loss_fn, init, shapes, dtype=dtype, section=config.autoencoder)

  data = load_image_set(config).limited(config.train_images)
  prompts = make_prompts(config, None, data)
  distinct = sorted(set(data.captions))
  label_of = dict(zip(data.captions, data.labels[data.index], strict=True))
  table = prompts.inputs(distinct, np.asarray([label_of[c] for c in distinct]))
  model = stages.denoiser_model(config, prompts, ae, dtype)

  def lower_denoiser(batch: int, mesh):
    loss_fn = ldm.denoiser_loss(
      model, stages.make_schedule(config), table, scale_factor=config.scale_factor or 1.0,
      cond_drop_prob=config.cond_drop_prob, prediction=config.prediction, shift_factor=config.shift_factor,
    )  # fmt: skip
    shapes = {
      "latent_mean": ((batch, *latent), np.float32),
      "latent_std": ((batch, *latent), np.float32),
      "prompt": ((batch,), np.int32),
      "label": ((batch,), np.int32),
    }
    init = stages.denoiser_init(model, table)
    return planning.lower_train_step(mesh, loss_fn, init, shapes, dtype=dtype, section=config.denoiser)

  return [
    planning.PlanStep("autoencoder", "autoencoder.batch_size", lower_autoencoder, config.autoencoder.grad_accum_steps),
    planning.PlanStep("denoiser", "denoiser.batch_size", lower_denoiser, config.denoiser.grad_accum_steps),
  ]
