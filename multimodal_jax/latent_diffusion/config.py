"""The rules of latent diffusion's config keys (`experiments/latent_diffusion/config.py` sets their
defaults), the keys an evaluation may change on a trained run, and the run's directories.

A workdir holds stage 1 in `WORKDIR/autoencoder` and stage 2 in `WORKDIR/denoiser`; the denoiser's
saved config fixes the keys of every later mode (sample, eval, export).
"""

from __future__ import annotations

import os

import ml_collections

from multimodal_jax import loop
from multimodal_jax.attention import ATTENTION_IMPLEMENTATIONS
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, between, one_of, source_needs
from multimodal_jax.data import specs
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion import diffusion
from multimodal_jax.latent_diffusion.autoencoder_kl import PRESETS as AE_PRESETS
from multimodal_jax.latent_diffusion.data import EMBEDDED
from multimodal_jax.latent_diffusion.dit import PRESETS as DIT_PRESETS
from multimodal_jax.latent_diffusion.prompts import CONDITIONS

STAGES = ("all", "autoencoder", "denoiser")

# The keys sample / eval / export may set differently from the trained run's.
EVAL_KEYS = (
    "mesh", "data_dir", "export_to", "compile_cache", "prompt", "guidance_scale", "sampler", "sample_steps", "eta", "num_samples", "seed",
    "eval_samples_per_digit", "eval_batch_size", "classifier_steps", "eval_test_images", "attention",
)  # fmt: skip

# Keys the denoiser's training adds to its saved config: the steps of the runs it was trained on.
RECORDED_KEYS = ("autoencoder_step", "clip_step")

CLASSIFIER_FILE = "digit_classifier.npz"

# The data settings latent diffusion reads (multimodal_jax.data.specs), with its defaults.
DATA_DEFAULTS = {"image_size": 32, "channels": 1}
DATA_KEYS = (
  "data_dir", "image_key", "text_key", "label_key", "csv_image_key", "csv_caption_key", "csv_separator", "image_size",
  "channels",
)  # fmt: skip

VAE_SOURCE = "diffusers_vae:"


def _vae_source_ok(value) -> bool:
  return isinstance(value, str) and (value == "" or (value.startswith(VAE_SOURCE) and len(value) > len(VAE_SOURCE)))


def _positive_int(v) -> bool:
  return isinstance(v, int) and v > 0


RULES = {
  **loop.base_rules(),
  **loop.base_rules("autoencoder.", section=True),
  **loop.base_rules("denoiser.", section=True),
  "condition": one_of(*CONDITIONS),
  "stage": one_of(*STAGES),
  "final_eval": BOOL,
  **{k: v for k, v in specs.config_rules().items() if k in DATA_KEYS},
  "dataset": specs.spec_rule((EMBEDDED,)),
  "templates": TEXT,
  "autoencoder_from": Rule(_vae_source_ok, "empty or diffusers_vae:DIR (a diffusers AutoencoderKL folder)"),
  "export_to": Rule(_vae_source_ok, "empty or diffusers_vae:DIR (the folder to write)"),
  "shift_factor": Rule(lambda v: isinstance(v, (int, float)), "a number"),
  "train_images": NON_NEGATIVE,
  "context_length": Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
  "clip_workdir": TEXT,  # checked where the CLIP run is restored, with the command that makes one
  "text_width": POSITIVE,
  "text_layers": POSITIVE,
  "text_heads": POSITIVE,
  "dit": one_of(*DIT_PRESETS),
  "patch_size": one_of(1, 2, 4, 8),
  "attention": one_of(*ATTENTION_IMPLEMENTATIONS),
  "scale_factor": NON_NEGATIVE,
  "schedule": one_of(*diffusion.SCHEDULES),
  "num_train_timesteps": Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
  "prediction": one_of(*diffusion.PREDICTIONS),
  "cond_drop_prob": between(0, 1),
  "autoencoder.preset": one_of("auto", *AE_PRESETS),
  "autoencoder.kl_weight": NON_NEGATIVE,
  "prompt": Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a prompt (several separated by ';')"),
  "guidance_scale": NON_NEGATIVE,
  "sampler": one_of(*diffusion.SAMPLERS),
  "sample_steps": POSITIVE,
  "eta": NON_NEGATIVE,
  "num_samples": Rule(_positive_int, "an integer > 0"),
  "eval_samples_per_digit": Rule(_positive_int, "an integer > 0"),
  "eval_batch_size": Rule(_positive_int, "an integer > 0"),
  "classifier_steps": Rule(_positive_int, "an integer > 0"),
  "eval_test_images": between(1, 1000),
}


def sample_steps_relation(config) -> None:
  if config.sample_steps > config.num_train_timesteps:
    raise UserError(f"sample_steps={config.sample_steps}: choose 1 to num_train_timesteps={config.num_train_timesteps}")


minilm_relation = source_needs("denoiser.init_from", "minilm", "condition", "minilm", "the locked text encoder")


RELATIONS = (
  loop.batch_relation("autoencoder."),
  loop.batch_relation("denoiser."),
  sample_steps_relation,
  minilm_relation,
)


def stage_dirs(workdir: str) -> tuple[str, str]:
  """`(autoencoder, denoiser)`: the two stages' checkpoint directories in `workdir`."""
  return os.path.join(workdir, "autoencoder"), os.path.join(workdir, "denoiser")


def stage_dir(workdir: str) -> str:
  """The directory whose checkpoint fixes the keys of a trained run (sample, eval): the denoiser's."""
  return stage_dirs(workdir)[1]


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
