"""The latent diffusion experiment's config: `get_config()` (its keys: the package docstring) and
the loop / optimizer config of each stage.
"""

from __future__ import annotations

import ml_collections

CONDITIONS = ("text", "minilm", "clip", "class")


STAGES = ("all", "autoencoder", "denoiser")


EVAL_KEYS = (
    "mesh", "data_dir", "prompt", "guidance_scale", "sampler", "sample_steps", "eta", "num_samples", "seed",
    "eval_samples_per_digit", "eval_batch_size", "classifier_steps", "eval_test_images",
)  # fmt: skip


SCALE_FILE = "latent_scale.json"


LATENTS_FILE = "latents.npz"


CLASSIFIER_FILE = "digit_classifier.npz"


def get_config() -> ml_collections.ConfigDict:
  """Latent diffusion on captioned digits (keys: the docstring of experiments/latent_diffusion/__init__.py)."""
  c = ml_collections.ConfigDict()
  c.condition = "text"
  c.stage = "all"
  c.final_eval = True  # evaluate after training the denoiser
  c.seed = 0
  c.mesh = "data:-1"
  c.dtype = "float32"
  c.data_dir = ""
  c.train_images = 0  # 0: all 4,000 distinct training images; N: the first N (quick runs, tests)
  # Prompt encoder.
  c.context_length = 16  # text and minilm; clip uses the CLIP run's
  c.clip_workdir = ""  # condition=clip: the workdir of a finished `python -m experiments.clip` run
  c.text_width = 128
  c.text_layers = 2
  c.text_heads = 4
  # Denoiser and diffusion.
  c.dit = "tiny"
  c.patch_size = 2
  c.scale_factor = 0.0  # 0: measured from the training latents after stage 1
  c.schedule = "scaled_linear"
  c.num_train_timesteps = 1000
  c.prediction = "epsilon"
  c.cond_drop_prob = 0.1
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.preset = "digits"
  c.autoencoder.steps = 600
  c.autoencoder.batch_size = 64
  c.autoencoder.learning_rate = 1e-3
  c.autoencoder.warmup_steps = 100
  c.autoencoder.weight_decay = 0.0
  c.autoencoder.grad_clip = 1.0
  c.autoencoder.kl_weight = 1e-6
  c.autoencoder.ema_decay = 0.0
  c.autoencoder.log_every = 50
  c.autoencoder.checkpoint_every = 500
  c.autoencoder.keep_checkpoints = 2
  c.denoiser = ml_collections.ConfigDict()
  c.denoiser.steps = 1500
  c.denoiser.batch_size = 128
  c.denoiser.learning_rate = 1e-3
  c.denoiser.warmup_steps = 100
  c.denoiser.weight_decay = 0.0
  c.denoiser.grad_clip = 1.0
  c.denoiser.ema_decay = 0.995
  c.denoiser.log_every = 50
  c.denoiser.checkpoint_every = 500
  c.denoiser.keep_checkpoints = 2
  # Sampling and evaluation.
  c.prompt = "a handwritten digit seven"
  c.guidance_scale = 3.0
  c.sampler = "ddim"
  c.sample_steps = 50
  c.eta = 0.0
  c.num_samples = 8
  c.eval_samples_per_digit = 50
  c.eval_batch_size = 250
  c.classifier_steps = 300
  c.eval_test_images = 1000  # held-out images for reconstruction MSE and the FID reference (at most 1,000)
  return c


def stage_config(config, name: str) -> ml_collections.ConfigDict:
  """The loop / optimizer config of one stage: its own keys plus the shared seed and dtype."""
  merged = {"seed": config.seed, "dtype": config.dtype, **config[name].to_dict()}
  return ml_collections.ConfigDict(merged)
