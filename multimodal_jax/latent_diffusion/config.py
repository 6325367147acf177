"""Latent diffusion's config: every key declared once in `KEYS` (default, rule, help, group), from which
`get_config()` and `RULES` derive; the keys an evaluation may change on a trained run; the run's
directories.

A workdir holds stage 1 in `WORKDIR/autoencoder` and stage 2 in `WORKDIR/denoiser`; the denoiser's
saved config fixes the keys of every later mode (sample, eval, export).
"""

from __future__ import annotations

import os

import ml_collections

from multimodal_jax import config as cfg
from multimodal_jax import loop
from multimodal_jax.attention import ATTENTION_IMPLEMENTATIONS
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Key, Rule, between, one_of, source_needs
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
  if isinstance(value, str) and value.startswith("hf-hub:"):
    return len(value) > len("hf-hub:")
  return isinstance(value, str) and (value == "" or (value.startswith(VAE_SOURCE) and len(value) > len(VAE_SOURCE)))


def _positive_int(v) -> bool:
  return isinstance(v, int) and v > 0


# The data settings' help lines (their defaults and rules: multimodal_jax.data.specs).
DATA_HELP = {
  "data_dir": "TFDS data dir and the image cache's home; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets",
  "image_key": "a TFDS dataset's image feature",
  "text_key": "a TFDS dataset's caption feature (else captions from templates and the class names)",
  "label_key": "a TFDS dataset's ClassLabel feature",
  "csv_image_key": "csv: the image path column (open_clip's --csv-img-key)",
  "csv_caption_key": "csv: the caption column (open_clip's --csv-caption-key)",
  "csv_separator": "csv: the column separator (open_clip's --csv-separator)",
  "image_size": "image side in pixels",
  "channels": "image channels: 1 or 3",
}

# The two stages' sub-configs, as `--help` explains them.
GROUPS = {
  "stages": "which stages a training run trains, and what follows",
  "autoencoder": "stage 1, the KL autoencoder (WORKDIR/autoencoder): its own loop and optimizer keys, "
  "--config.autoencoder.KEY (e.g. --config.autoencoder.steps=20000)",
  "denoiser": "stage 2, the DiT denoiser on the autoencoder's latents (WORKDIR/denoiser, EMA weights for sampling "
  "and evaluation): its own loop and optimizer keys, --config.denoiser.KEY",
}


def _top_loop_keys() -> dict[str, Key]:
  """The loop's keys that stay at the top (seed, mesh, dtype, ...); the rest live in each stage's section."""
  return {name: key for name, key in loop.base_keys().items() if name in loop.TOP_KEYS}


KEYS = {
  **_top_loop_keys(),
  "condition": Key(
    "text",
    one_of(*CONDITIONS),
    "the denoiser's condition: text (a small Transformer trained with it), minilm, clip (clip_workdir) or class",
    "stages",
  ),
  "stage": Key(
    "all", one_of(*STAGES), "all: both stages (each resumes on its own); autoencoder or denoiser: that one", "stages"
  ),
  "final_eval": Key(True, BOOL, "evaluate after training the denoiser", "stages"),
  "dataset": Key(
    EMBEDDED,
    specs.spec_rule((EMBEDDED,)),
    f"{EMBEDDED}, or csv:PATH, folder:DIR or tfds:NAME at image_size x image_size x channels",
    "data",
  ),
  **cfg.keys_from(
    {k: v for k, v in specs.config_keys(**DATA_DEFAULTS).items() if k in DATA_KEYS},
    specs.config_rules(),
    DATA_HELP,
    "data",
  ),
  "templates": Key(
    "",
    TEXT,
    'captions of class-only data: empty ("a photo of a {}"), openai, or a FILE of one template per line',
    "data",
  ),
  "train_images": Key(
    0, NON_NEGATIVE, "0: all 4,000 distinct training images; N: the first N (quick runs, tests)", "data"
  ),
  "context_length": Key(
    16,
    Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    "prompt tokens (text and minilm; clip uses the CLIP run's)",
    "model",
  ),
  "clip_workdir": Key(
    "", TEXT, "condition=clip: the workdir of a finished `python -m experiments.clip` run", "model"
  ),  # checked where the CLIP run is restored
  "text_width": Key(128, POSITIVE, "condition=text: the prompt encoder's width", "model"),
  "text_layers": Key(2, POSITIVE, "condition=text: its layers", "model"),
  "text_heads": Key(4, POSITIVE, "condition=text: its attention heads", "model"),
  "dit": Key("tiny", one_of(*DIT_PRESETS), "DiT preset of multimodal_jax.latent_diffusion.dit", "model"),
  "remat": cfg.remat_key(),
  "patch_size": Key(2, one_of(1, 2, 4, 8), "the DiT's patch side, in latent pixels", "model"),
  "attention": Key(
    "auto",
    one_of(*ATTENTION_IMPLEMENTATIONS),
    "attention.dot_product_attention: auto, cpu, einsum, xla or cudnn",
    "model",
  ),
  "scale_factor": Key(0.0, NON_NEGATIVE, "latent scale; 0: measured from the training latents after stage 1", "model"),
  "schedule": Key("scaled_linear", one_of(*diffusion.SCHEDULES), "noise schedule", "model"),
  "num_train_timesteps": Key(
    1000, Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"), "diffusion steps of training", "model"
  ),
  "prediction": Key(
    "epsilon", one_of(*diffusion.PREDICTIONS), "what the denoiser predicts: the noise, v or the sample", "model"
  ),
  "cond_drop_prob": Key(
    0.1, between(0, 1), "probability of dropping the condition in training (classifier-free guidance)", "model"
  ),
  **cfg.in_section(
    "autoencoder", loop.base_keys(section=True, steps=600, warmup_steps=100, checkpoint_every=500, keep_checkpoints=2)
  ),
  "autoencoder.preset": Key(
    "auto",
    one_of("auto", *AE_PRESETS),
    "auto: digits (latents image_size/4) up to 32 px, small_f8 (/8) above",
    "autoencoder",
  ),
  "autoencoder.kl_weight": Key(1e-6, NON_NEGATIVE, "weight of the KL term of the autoencoder's loss", "autoencoder"),
  "autoencoder_from": Key(
    "",
    Rule(_vae_source_ok, "empty or diffusers_vae:DIR (a diffusers AutoencoderKL folder)"),
    "diffusers_vae:DIR: a pretrained VAE instead of stage 1",
    "autoencoder",
  ),
  "shift_factor": Key(
    0.0,
    Rule(lambda v: isinstance(v, (int, float)), "a number"),
    "latent shift; set from a pretrained VAE's config",
    "autoencoder",
  ),
  **cfg.in_section(
    "denoiser",
    loop.base_keys(section=True, steps=1500, batch_size=128, ema_decay=0.995, checkpoint_every=500, keep_checkpoints=2),
  ),
  "prompt": Key(
    "a handwritten digit seven",
    Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a prompt (several separated by ';')"),
    "--mode=sample: the prompt; several separated by ';', one grid row each",
    "sample",
  ),
  "guidance_scale": Key(3.0, NON_NEGATIVE, "classifier-free guidance scale", "sample"),
  "sampler": Key("ddim", one_of(*diffusion.SAMPLERS), "ddpm or ddim", "sample"),
  "sample_steps": Key(50, POSITIVE, "sampling steps (at most num_train_timesteps)", "sample"),
  "eta": Key(0.0, NON_NEGATIVE, "DDIM's eta (0: deterministic)", "sample"),
  "num_samples": Key(8, Rule(_positive_int, "an integer > 0"), "grid columns; column j uses seed + j", "sample"),
  "eval_samples_per_digit": Key(
    50, Rule(_positive_int, "an integer > 0"), "generated images per digit for conditional_accuracy and fid", "eval"
  ),
  "eval_batch_size": Key(250, Rule(_positive_int, "an integer > 0"), "batch size of evaluation's sampling", "eval"),
  "classifier_steps": Key(
    300, Rule(_positive_int, "an integer > 0"), "training steps of the small CNN that judges the samples", "eval"
  ),
  "eval_test_images": Key(
    1000, between(1, 1000), "held-out images for reconstruction MSE and the FID reference (at most 1,000)", "eval"
  ),
  "export_to": Key(
    "",
    Rule(_vae_source_ok, "empty or diffusers_vae:DIR (the folder to write)"),
    "--mode=export: diffusers_vae:DIR, the run's autoencoder as a diffusers folder",
    "export",
  ),
}

RULES = cfg.rules_of(KEYS)


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


@cfg.declares(KEYS, GROUPS)
def get_config() -> ml_collections.ConfigDict:
  """Latent diffusion on captioned digits, or on your images: a KL autoencoder, then a DiT on its latents."""
  return cfg.make_config(KEYS)
