"""The two training stages: the KL autoencoder (then the latent scale factor and the training
latents, computed once), and the prompt-conditioned DiT denoiser on those latents.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.latent_diffusion.build import (
  ArraySource,
  autoencoder_init,
  autoencoder_model,
  batched,
  denoiser_init,
  denoiser_model,
  load_data,
  make_encode,
  make_schedule,
  restore_autoencoder,
  stage_dirs,
  to_signed_unit,
  training_set,
)
from experiments.latent_diffusion.config import LATENTS_FILE, SCALE_FILE
from experiments.latent_diffusion.prompts import Prompts, check_clip_step, prompt_digit
from multimodal_jax import checkpoint, diffusion, loop, train
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.models import autoencoder_kl as akl
from multimodal_jax.models.prompt_encoder import ConditionedDenoiser


def train_autoencoder(config, workdir: str, mesh) -> None:
  ae_dir, _ = stage_dirs(workdir)
  cfg = config.autoencoder
  model = autoencoder_model(config)
  data = load_data(config)
  tx, schedule = train.make_optimizer(cfg)

  def loss_fn(params, batch, rng):
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return akl.autoencoder_loss(model, params, x, rng, cfg.kl_weight)

  train_set = training_set(config, data)
  source = ArraySource(image=train_set["images"])
  result = loop.fit(
    workdir=ae_dir,
    config=config,
    section="autoencoder",
    mesh=mesh,
    loss_fn=loss_fn,
    init_params=autoencoder_init(model),
    tx=tx,
    train_data=GrainBatches(source, cfg.batch_size, config.seed),
    learning_rate_fn=schedule,
  )
  step = int(result.state.step)
  mean, _ = training_latents(ae_dir, step, model, result.state.params, train_set["images"])
  saved = _read_scale(ae_dir)
  if saved is None or saved["step"] != step:
    _write_scale(ae_dir, step, akl.measure_scale_factor(mean))


def training_latents(ae_dir: str, step: int, model, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Posterior `(mean, logvar)` of the training images under the autoencoder at `step`, computed once
  and cached in `ae_dir/latents.npz`."""
  path = os.path.join(ae_dir, LATENTS_FILE)
  if os.path.isfile(path):
    with np.load(path) as cached:
      if int(cached["step"]) == step and len(cached["mean"]) == len(images):
        return cached["mean"], cached["logvar"]
  mean, logvar = batched(lambda x: make_encode(model)(params, x), to_signed_unit(images))
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, step=step, mean=mean, logvar=logvar)
    os.replace(tmp, path)
  return mean, logvar


def _read_scale(ae_dir: str) -> dict | None:
  path = os.path.join(ae_dir, SCALE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_scale(ae_dir: str, step: int, scale: float) -> None:
  if jax.process_index() == 0:
    tmp = os.path.join(ae_dir, SCALE_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"step": step, "scale_factor": scale}, f)
    os.replace(tmp, os.path.join(ae_dir, SCALE_FILE))
    print(f"latent scale factor {scale:.5f} (1 / std of the training latents) in {ae_dir}/{SCALE_FILE}", flush=True)


def _scale_factor(config, workdir: str, step: int, measure) -> float:
  """The denoiser's latent scale: a resumed denoiser's own, else `config.scale_factor`, else stage 1's
  measurement (`measure()` when that file is missing or from another autoencoder step)."""
  ae_dir, dn_dir = stage_dirs(workdir)
  if checkpoint.saved_steps(dn_dir):
    return float(checkpoint.read_config(dn_dir)["scale_factor"])
  if config.scale_factor > 0:
    return float(config.scale_factor)
  saved = _read_scale(ae_dir)
  if saved is not None and saved["step"] == step:
    return float(saved["scale_factor"])
  scale = akl.measure_scale_factor(measure())
  _write_scale(ae_dir, step, scale)
  return scale


def make_denoiser_loss(model: ConditionedDenoiser, schedule, table: dict, config):
  """loss_fn over batches of precomputed posteriors (`latent_mean`, `latent_std`) and prompt indices
  into `table` (the prompt inputs of every distinct training caption)."""
  table = jax.tree.map(jnp.asarray, table)

  def loss_fn(params, batch, rng):
    post_key, drop_key, diff_key = jax.random.split(rng, 3)
    mean, std = batch["latent_mean"], batch["latent_std"]
    z = (mean + std * jax.random.normal(post_key, mean.shape, mean.dtype)) * config.scale_factor
    inputs = jax.tree.map(lambda a: a[batch["prompt"]], table)
    context, mask = model.apply({"params": params}, inputs, method=model.encode_prompt)
    mask = diffusion.drop_condition(drop_key, mask, config.cond_drop_prob)

    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, context.astype(x_t.dtype), mask, method=model.denoise)

    return diffusion.diffusion_loss(model_fn, schedule, z, diff_key, config.prediction)

  return loss_fn


def train_denoiser(config, workdir: str, mesh) -> None:
  _, dn_dir = stage_dirs(workdir)
  prompts = Prompts(config, mesh)
  if prompts.clip is not None and checkpoint.saved_steps(dn_dir):  # resuming: the same CLIP features
    check_clip_step(checkpoint.read_config(dn_dir), prompts, dn_dir)
  ae, ae_params, ae_step = restore_autoencoder(config, workdir, mesh)
  cfg = config.denoiser
  train_set = training_set(config, load_data(config))
  ae_dir, _ = stage_dirs(workdir)
  mean, logvar = training_latents(ae_dir, ae_step, ae, ae_params, train_set["images"])
  config = ml_collections.ConfigDict(config.to_dict())
  config.scale_factor = _scale_factor(config, workdir, ae_step, lambda: mean)
  if prompts.clip is not None:  # absolute, so that sample / eval from another directory find it
    config.clip_workdir = os.path.abspath(config.clip_workdir)
  captions, index = train_set["captions"], train_set["index"]
  distinct = sorted(set(captions))
  prompt_index = np.asarray([distinct.index(c) for c in captions], np.int32)
  table = prompts.inputs(distinct, np.asarray([prompt_digit(c) for c in distinct]))
  source = ArraySource(
    latent_mean=mean[index], latent_std=np.exp(0.5 * logvar)[index], prompt=prompt_index,
    label=train_set["labels"][index],
  )  # fmt: skip
  model = denoiser_model(config, prompts, ae)
  tx, lr = train.make_optimizer(cfg)
  saved = {**config.to_dict(), "autoencoder_step": ae_step}  # recorded with the denoiser
  if prompts.clip is not None:
    saved["clip_step"] = prompts.clip.step
  loop.fit(
    workdir=dn_dir,
    config=saved,
    section="denoiser",
    mesh=mesh,
    loss_fn=make_denoiser_loss(model, make_schedule(config), table, config),
    init_params=denoiser_init(model, config, table),
    tx=tx,
    train_data=GrainBatches(source, cfg.batch_size, config.seed),
    learning_rate_fn=lr,
  )
