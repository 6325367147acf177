"""The latent diffusion experiment's config: `get_config()` (its keys: the package docstring; their rules:
`multimodal_jax.latent_diffusion_config`), with the loop / optimizer config of each stage.
"""

from __future__ import annotations

import ml_collections

from multimodal_jax import loop
from multimodal_jax.data import specs
from multimodal_jax.latent_diffusion_config import DATA_DEFAULTS, DATA_KEYS
from multimodal_jax.latent_diffusion_data import EMBEDDED


def get_config() -> ml_collections.ConfigDict:
  """Latent diffusion on captioned digits (keys: the docstring of experiments/latent_diffusion/__init__.py)."""
  c = ml_collections.ConfigDict()
  c.condition = "text"
  c.stage = "all"
  c.final_eval = True  # evaluate after training the denoiser
  c.seed = 0
  c.mesh = "data:-1"
  c.dtype = "float32"
  c.profile_steps = ""
  c.compile_cache = ""
  # Data: the embedded digits, or csv:PATH / folder:DIR / tfds:NAME (multimodal_jax.data.specs) at
  # image_size x image_size x channels; class-only data is captioned with `templates`.
  c.dataset = EMBEDDED
  c.update({k: v for k, v in specs.config_keys(**DATA_DEFAULTS).items() if k in DATA_KEYS})
  c.templates = ""  # "": "a photo of a {}"; openai; or a FILE of one template per line
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
  c.attention = "auto"  # attention.dot_product_attention: auto | cpu | einsum | xla | cudnn
  c.scale_factor = 0.0  # 0: measured from the training latents after stage 1
  c.schedule = "scaled_linear"
  c.num_train_timesteps = 1000
  c.prediction = "epsilon"
  c.cond_drop_prob = 0.1
  # The two stages' loop and optimizer keys (loop.base_config), each with its own.
  c.autoencoder = loop.base_config(section=True, steps=600, warmup_steps=100, checkpoint_every=500, keep_checkpoints=2)
  c.autoencoder.preset = "auto"  # auto: digits (latents image_size/4) up to 32 px, small_f8 (/8) above
  c.autoencoder_from = ""  # diffusers_vae:DIR: a pretrained VAE instead of stage 1
  c.export_to = ""  # --mode=export: diffusers_vae:DIR
  c.shift_factor = 0.0  # set from a pretrained VAE's config
  c.autoencoder.kl_weight = 1e-6
  c.denoiser = loop.base_config(
    section=True, steps=1500, batch_size=128, ema_decay=0.995, checkpoint_every=500, keep_checkpoints=2
  )
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
