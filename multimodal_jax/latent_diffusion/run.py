"""Latent diffusion's modes: train (stage 1, the autoencoder, then stage 2, the denoiser on its latents; then
the evaluation), sample, eval and export (`generate`)."""

from __future__ import annotations

import sys
import time

import jax

from multimodal_jax import cli, loop, planning
from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion import plan as latent_diffusion_plan
from multimodal_jax.latent_diffusion.config import EVAL_KEYS, RELATIONS, RULES, STAGES, get_config, stage_dir
from multimodal_jax.latent_diffusion.generate import run_eval, run_export, run_sample
from multimodal_jax.latent_diffusion.prompts import make_prompts
from multimodal_jax.latent_diffusion.stages import check_pretrained_vae, train_autoencoder, train_denoiser


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
    check_pretrained_vae(config)  # a bad folder fails before the data loads
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
    {
      "train": run_train,
      "sample": run_sample,
      "eval": run_eval,
      "export": run_export,
      "plan": planning.plan_mode(latent_diffusion_plan.plan_steps),
    },
    argv,
    prog="python -m experiments.latent_diffusion",
    rules=RULES,
    relations=RELATIONS,
    eval_keys=EVAL_KEYS,
    saved_run=stage_dir,
  )
