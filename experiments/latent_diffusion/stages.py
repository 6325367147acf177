"""The two training stages: the KL autoencoder (then its training latents and the latent scale factor),
and the prompt-conditioned DiT denoiser on those latents.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.latent_diffusion import build
from multimodal_jax import checkpoint, loop, train
from multimodal_jax import latent_diffusion as ldm
from multimodal_jax.data.pipeline import ArraySource, GrainBatches
from multimodal_jax.models import autoencoder_kl as akl


def train_autoencoder(config, workdir: str, mesh) -> None:
  ae_dir, _ = build.stage_dirs(workdir)
  cfg = config.autoencoder
  model = build.autoencoder_model(config)
  tx, schedule = train.make_optimizer(cfg)

  def loss_fn(params, batch, rng):
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return akl.autoencoder_loss(model, params, x, rng, cfg.kl_weight)

  images = build.load_data(config).limited(config.train_images).images
  result = loop.fit(
    workdir=ae_dir,
    config=config,
    section="autoencoder",
    mesh=mesh,
    loss_fn=loss_fn,
    init_params=build.autoencoder_init(model, config.image_size),
    tx=tx,
    train_data=GrainBatches(ArraySource(image=images), cfg.batch_size, config.seed),
    learning_rate_fn=schedule,
  )
  step = int(result.state.step)
  mean, _ = ldm.training_latents(ae_dir, step, model, result.state.params, images)
  saved = ldm.read_scale(ae_dir)
  if saved is None or saved["step"] != step:
    ldm.write_scale(ae_dir, step, akl.measure_scale_factor(mean))


def scale_factor(config, workdir: str, step: int, mean: np.ndarray, pretrained: float | None = None) -> float:
  """The denoiser's latent scale: a resumed denoiser's own, else `config.scale_factor`, else a pretrained
  VAE's `pretrained` scaling factor, else stage 1's measurement (measured again from `mean` when that
  file is missing or from another autoencoder step)."""
  ae_dir, dn_dir = build.stage_dirs(workdir)
  if checkpoint.saved_steps(dn_dir):
    return float(checkpoint.read_config(dn_dir)["scale_factor"])
  if config.scale_factor > 0:
    return float(config.scale_factor)
  if pretrained:
    return float(pretrained)
  saved = ldm.read_scale(ae_dir)
  if saved is not None and saved["step"] == step:
    return float(saved["scale_factor"])
  scale = akl.measure_scale_factor(mean)
  ldm.write_scale(ae_dir, step, scale)
  return scale


def train_denoiser(config, workdir: str, mesh) -> None:
  ae_dir, dn_dir = build.stage_dirs(workdir)
  data = build.load_data(config)
  prompts = build.make_prompts(config, mesh, data)
  if prompts.clip is not None and checkpoint.saved_steps(dn_dir):  # resuming: the same CLIP features
    build.check_clip_step(checkpoint.read_config(dn_dir), prompts, dn_dir)
  ae, ae_params, ae_step = build.restore_autoencoder(workdir, mesh, config)
  train_set = data.limited(config.train_images)
  os.makedirs(ae_dir, exist_ok=True)  # the latents' cache, also for a pretrained VAE
  mean, logvar = ldm.training_latents(ae_dir, ae_step, ae, ae_params, train_set.images)
  config = ml_collections.ConfigDict(config.to_dict())
  pretrained_scale = None
  if config.autoencoder_from:
    pretrained_scale, config.shift_factor = build.vae_factors(ae)
    config.autoencoder_from = build.VAE_SOURCE + os.path.abspath(config.autoencoder_from[len(build.VAE_SOURCE) :])
  config.scale_factor = scale_factor(config, workdir, ae_step, mean, pretrained_scale)
  if prompts.clip is not None:  # absolute, so that sample / eval from another directory find it
    config.clip_workdir = os.path.abspath(config.clip_workdir)
  captions, index = train_set.captions, train_set.index
  distinct = sorted(set(captions))
  label_of = {c: label for c, label in zip(captions, train_set.labels[index])}
  table = prompts.inputs(distinct, np.asarray([label_of[c] for c in distinct]))
  row = {c: i for i, c in enumerate(distinct)}
  source = ArraySource(
    latent_mean=mean[index], latent_std=np.exp(0.5 * logvar)[index],
    prompt=np.asarray([row[c] for c in captions], np.int32), label=train_set.labels[index],
  )  # fmt: skip
  model = build.denoiser_model(config, prompts, ae)
  tx, lr = train.make_optimizer(config.denoiser)
  saved = {**config.to_dict(), "autoencoder_step": ae_step}  # recorded with the denoiser
  if prompts.clip is not None:
    saved["clip_step"] = prompts.clip.step
  loss_fn = ldm.denoiser_loss(
    model, build.make_schedule(config), table, scale_factor=config.scale_factor,
    cond_drop_prob=config.cond_drop_prob, prediction=config.prediction, shift_factor=config.shift_factor,
  )  # fmt: skip
  loop.fit(
    workdir=dn_dir,
    config=saved,
    section="denoiser",
    mesh=mesh,
    loss_fn=loss_fn,
    init_params=build.denoiser_init(model, table),
    tx=tx,
    train_data=GrainBatches(source, config.denoiser.batch_size, config.seed),
    learning_rate_fn=lr,
  )
