"""Latent diffusion's run-level pieces (`experiments/latent_diffusion` wires them): the two models and
their init functions from a config, the run's autoencoder (trained in stage 1, or a pretrained
diffusers VAE from `autoencoder_from`), and the two training stages.

Stage 1 (`train_autoencoder`, `WORKDIR/autoencoder`): an `AutoencoderKL` trained on reconstruction +
beta KL, then the latent scale factor (1 / std of the encoder means over the training images) written to
`latent_scale.json`. Stage 2 (`train_denoiser`, `WORKDIR/denoiser`): a `ConditionedDenoiser` on scaled
latents (posteriors precomputed once), the condition dropped with probability `cond_drop_prob` for
classifier-free guidance; its saved config records the latent scale and the steps of the runs it
was trained on (`autoencoder_step`, `clip_step`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from multimodal_jax import checkpoint, init_from, loop, train
from multimodal_jax.arrays import floating_dtype
from multimodal_jax.config import source_path
from multimodal_jax.data.pipeline import ArraySource, GrainBatches
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.latent_diffusion import autoencoder_kl as akl
from multimodal_jax.latent_diffusion import diffusion
from multimodal_jax.latent_diffusion import pipeline as ldm
from multimodal_jax.latent_diffusion.config import VAE_SOURCE, stage_dirs
from multimodal_jax.latent_diffusion.data import load_image_set
from multimodal_jax.latent_diffusion.dit import dit_config
from multimodal_jax.latent_diffusion.prompt_encoder import ConditionedDenoiser
from multimodal_jax.latent_diffusion.prompts import Prompts, check_clip_step, make_prompts
from multimodal_jax.sharding import mesh_platform


def autoencoder_model(config, dtype: str = "float32") -> akl.AutoencoderKL:
  """The stage-1 autoencoder: `autoencoder.preset` (`auto`: by `image_size`, `akl.preset_for_size`)
  with `channels` in and out, computing in `dtype` (training: the step's compute dtype)."""
  preset = config.autoencoder.preset
  if preset == "auto":
    preset = akl.preset_for_size(config.image_size)
  ae_config = akl.PRESETS[preset]
  if ae_config.in_channels != config.channels or ae_config.out_channels != config.channels:
    ae_config = dataclasses.replace(ae_config, in_channels=config.channels, out_channels=config.channels)
  if ae_config.dtype != dtype:
    ae_config = dataclasses.replace(ae_config, dtype=dtype)
  return akl.AutoencoderKL(ae_config)


def autoencoder_init(model: akl.AutoencoderKL, image_size: int = 32):
  shape = (1, image_size, image_size, model.config.in_channels)
  return lambda rng: model.init({"params": rng}, jnp.zeros(shape, jnp.float32))["params"]


def latent_side(config, ae: akl.AutoencoderKL) -> int:
  """The latent grid's side: `image_size` over the autoencoder's downsampling; UserError when either
  division leaves a remainder."""
  factor = ae.config.downsampling_factor
  side = config.image_size // factor
  if side * factor != config.image_size or side % config.patch_size:
    raise UserError(
      f"image_size={config.image_size} gives no whole latent grid: the autoencoder downsamples by {factor} and the "
      f"DiT patches are {config.patch_size} latents wide; choose an image_size divisible by {factor * config.patch_size}"
    )
  return side


def denoiser_model(config, prompts: Prompts, ae: akl.AutoencoderKL, dtype: str = "float32") -> ConditionedDenoiser:
  """The stage-2 denoiser (a DiT with its prompt encoder) on `ae`'s latents, computing in `dtype`."""
  side = latent_side(config, ae)
  dit = dit_config(
      config.dit, input_size=side, in_channels=ae.config.latent_channels, patch_size=config.patch_size,
      context_dim=prompts.context_dim, attention=config.get("attention", "auto"), dtype=dtype,
      remat=config.get("remat", "none"),
  )  # fmt: skip
  return ConditionedDenoiser(
      dit, prompts.encoder_kind, vocab_size=prompts.vocab_size, context_length=config.context_length,
      num_classes=max(prompts.num_classes, 1), text_width=config.text_width, text_layers=config.text_layers,
      text_heads=config.text_heads,
  )  # fmt: skip


def denoiser_init(model: ConditionedDenoiser, example_inputs: dict):
  side, channels = model.dit.input_size, model.dit.in_channels
  x = jnp.zeros((1, side, side, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  inputs = jax.tree.map(lambda a: jnp.asarray(a[:1]), example_inputs)
  return lambda rng: model.init({"params": rng}, x, t, inputs)["params"]


def make_schedule(config) -> diffusion.Schedule:
  return diffusion.make_schedule(config.schedule, config.num_train_timesteps)


def check_pretrained_vae(config, vae_config: akl.AutoencoderKLConfig | None = None) -> akl.AutoencoderKLConfig:
  """The `AutoencoderKLConfig` of `config.autoencoder_from` (`diffusers_vae:DIR`), read from its config.json
  alone (cheap: a run checks it before it loads any data); UserError when the folder is not a VAE, when the
  VAE does not take `channels` or when its downsampling does not divide `image_size`."""
  if vae_config is None:
    from multimodal_jax.latent_diffusion.diffusers_vae import read_diffusers_vae_config

    vae_config = read_diffusers_vae_config(source_path(config.autoencoder_from, "diffusers_vae"))[0]
  if vae_config.in_channels != config.channels or vae_config.out_channels != config.channels:
    raise UserError(
      f"{config.autoencoder_from} takes {vae_config.in_channels}-channel images and the data has "
      f"{config.channels}: set --config.channels={vae_config.in_channels}"
    )
  latent_side(config, akl.AutoencoderKL(vae_config))
  return vae_config


def pretrained_vae(config, mesh):
  """`(model, params)` of `config.autoencoder_from` (`diffusers_vae:DIR`), params replicated on `mesh`;
  UserError as `check_pretrained_vae`, and when the weights do not fit the config."""
  from multimodal_jax.latent_diffusion.diffusers_vae import load_diffusers_vae

  vae_config, params = load_diffusers_vae(source_path(config.autoencoder_from, "diffusers_vae"))
  model = akl.AutoencoderKL(check_pretrained_vae(config, vae_config))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return model, jax.device_put(params, replicated)


def vae_factors(model: akl.AutoencoderKL) -> tuple[float | None, float]:
  """The pretrained VAE's `(scaling_factor, shift_factor)` from its config (None: measure it; shift 0)."""
  return model.config.scaling_factor, float(model.config.shift_factor or 0.0)


def restore_autoencoder(workdir: str, mesh, config=None):
  """`(model, params, step)` of the run's autoencoder: the pretrained one of `config.autoencoder_from`
  (step 0), else stage 1's; UserError when stage 1 has no checkpoint."""
  if config is not None and config.get("autoencoder_from"):
    return (*pretrained_vae(config, mesh), 0)
  ae_dir, _ = stage_dirs(workdir)
  if not checkpoint.saved_steps(ae_dir):
    raise UserError(
      f"no autoencoder checkpoint in {ae_dir}: train stage 1 first (same --workdir, --config.stage=all or "
      "--config.stage=autoencoder)"
    )
  model = autoencoder_model(ml_collections.ConfigDict(checkpoint.read_config(ae_dir)))
  step, params = from_checkpoint.restore_params(ae_dir, autoencoder_init(model), mesh, ema=False)
  return model, params, step


def autoencoder_loss_fn(model: akl.AutoencoderKL, kl_weight: float):
  """Stage 1's loss_fn over batches of uint8 images (scaled to [-1, 1] in the step's compute dtype)."""

  def loss_fn(params, batch, rng):
    x = (batch["image"].astype(jnp.float32) / 127.5 - 1.0).astype(floating_dtype(params))
    return akl.autoencoder_loss(model, params, x, rng, kl_weight)

  return loss_fn


def train_autoencoder(config, workdir: str, mesh) -> None:
  """Stage 1 in `workdir/autoencoder` (resumes from its checkpoint), then the training latents and the
  latent scale factor of the final step."""
  ae_dir, _ = stage_dirs(workdir)
  section = config.autoencoder
  model = autoencoder_model(config, loop.resolve_dtype(config.dtype, mesh_platform(mesh)))
  tx, schedule = train.make_optimizer(section)
  loss_fn = autoencoder_loss_fn(model, section.kl_weight)
  images = load_image_set(config).limited(config.train_images).images
  result = loop.fit(
    workdir=ae_dir,
    config=config,
    section="autoencoder",
    mesh=mesh,
    loss_fn=loss_fn,
    init_params=autoencoder_init(model, config.image_size),
    tx=tx,
    train_data=GrainBatches(ArraySource(image=images), section.batch_size, config.seed),
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
  ae_dir, dn_dir = stage_dirs(workdir)
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
  """Stage 2 in `workdir/denoiser` (resumes from its checkpoint) on the latents of the run's autoencoder."""
  ae_dir, dn_dir = stage_dirs(workdir)
  data = load_image_set(config)
  prompts = make_prompts(config, mesh, data)
  if prompts.clip is not None and checkpoint.saved_steps(dn_dir):  # resuming: the same CLIP features
    check_clip_step(checkpoint.read_config(dn_dir), prompts, dn_dir)
  ae, ae_params, ae_step = restore_autoencoder(workdir, mesh, config)
  train_set = data.limited(config.train_images)
  os.makedirs(ae_dir, exist_ok=True)  # the latents' cache, also for a pretrained VAE
  mean, logvar = ldm.training_latents(ae_dir, ae_step, ae, ae_params, train_set.images)
  config = ml_collections.ConfigDict(config.to_dict())
  pretrained_scale = None
  if config.autoencoder_from:
    pretrained_scale, config.shift_factor = vae_factors(ae)
    if config.autoencoder_from.startswith(VAE_SOURCE):  # absolute, so that sample / eval elsewhere find it
      config.autoencoder_from = VAE_SOURCE + os.path.abspath(config.autoencoder_from[len(VAE_SOURCE) :])
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
  model = denoiser_model(config, prompts, ae, loop.resolve_dtype(config.dtype, mesh_platform(mesh)))
  tx, lr = train.make_optimizer(config.denoiser)
  saved = {**config.to_dict(), "autoencoder_step": ae_step}  # recorded with the denoiser
  if prompts.clip is not None:
    saved["clip_step"] = prompts.clip.step
  loss_fn = ldm.denoiser_loss(
    model, make_schedule(config), table, scale_factor=config.scale_factor,
    cond_drop_prob=config.cond_drop_prob, prediction=config.prediction, shift_factor=config.shift_factor,
  )  # fmt: skip
  loop.fit(
    workdir=dn_dir,
    config=saved,
    section="denoiser",
    mesh=mesh,
    loss_fn=loss_fn,
    init_params=denoiser_init(model, table),
    tx=tx,
    train_data=GrainBatches(source, config.denoiser.batch_size, config.seed),
    learning_rate_fn=lr,
    converters={"minilm": init_from.outside_params},  # read by the prompts' featuriser instead
  )
