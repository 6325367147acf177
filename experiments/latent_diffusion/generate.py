"""Sampling from a trained workdir (`Generator`, `--mode=sample`) and its evaluation (`--mode=eval`)."""

from __future__ import annotations

import os

import jax
import numpy as np

from experiments.latent_diffusion import build
from experiments.latent_diffusion.config import CLASSIFIER_FILE, EVAL_KEYS, RECORDED_KEYS
from multimodal_jax import latent_diffusion as ldm
from multimodal_jax import sharding as shd
from multimodal_jax.arrays import batched_apply
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint, generative, images


class Generator:
  """The trained pipeline of a workdir: prompts, digits and seeds -> images in [-1, 1]."""

  def __init__(self, config, workdir: str):
    _, dn_dir = build.stage_dirs(workdir)
    config = from_checkpoint.saved_config(dn_dir, config, EVAL_KEYS, recorded=RECORDED_KEYS)
    if not 1 <= config.sample_steps <= config.num_train_timesteps:  # the run's own timesteps
      raise UserError(f"sample_steps={config.sample_steps}: choose 1 to {config.num_train_timesteps}")
    self.config = config
    self.mesh = shd.make_mesh(config.mesh)
    self.prompts = build.make_prompts(config, self.mesh)
    build.check_clip_step(config.to_dict(), self.prompts, dn_dir)
    ae, ae_params, self.ae_step = build.restore_autoencoder(workdir, self.mesh)
    self.ae, self.ae_params = ae, ae_params
    model = build.denoiser_model(config, self.prompts, ae)
    init = build.denoiser_init(model, self.prompts.inputs(["a handwritten digit zero"], np.zeros(1)))
    self.step, params = from_checkpoint.restore_params(dn_dir, init, self.mesh, ema=config.denoiser.ema_decay > 0)
    self.sampler = ldm.LatentSampler(
      model, params, ae, ae_params, build.make_schedule(config), scale_factor=config.scale_factor,
      prediction=config.prediction,
    )  # fmt: skip

  def __call__(self, texts: list[str], labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Images float32 `[n, 32, 32, 1]` in [-1, 1] for prompts `texts` (digits `labels`), one seed each."""
    c = self.config
    return self.sampler(
      self.prompts.inputs(texts, labels), seeds, seed=c.seed, batch_size=c.eval_batch_size,
      guidance_scale=float(c.guidance_scale), sampler=c.sampler, num_steps=c.sample_steps, eta=float(c.eta),
    )  # fmt: skip


def run_sample(config, workdir: str) -> dict:
  prompts = [p.strip() for p in config.prompt.split(";") if p.strip()]
  if not prompts:
    raise UserError("--config.prompt is empty: give a prompt such as 'a handwritten digit seven'")
  generator = Generator(config, workdir)
  labels = [generator.prompts.check(p) for p in prompts]
  cols = config.num_samples
  pictures = generator([p for p in prompts for _ in range(cols)], np.repeat(labels, cols),
                       np.tile(config.seed + np.arange(cols), len(prompts)))  # fmt: skip
  path = os.path.join(workdir, "samples.png")
  if jax.process_index() == 0:
    images.save_png(path, images.grid(images.to_uint8(pictures, -1.0, 1.0), columns=cols))
    c = generator.config
    print(f"wrote {path}: {len(prompts)} prompt(s) x {cols} seeds, guidance {c.guidance_scale}, "
          f"{c.sampler}-{c.sample_steps}", flush=True)  # fmt: skip
  return {"path": path, "digits": labels}


def run_eval(config, workdir: str) -> dict:
  generator = Generator(config, workdir)
  config = generator.config
  data = build.load_data(config)
  train = ldm.training_set(data["train"])  # the classifier sees all the distinct training images
  test_images, _, test_labels = ldm.split_arrays(data["test"])
  if not 2 <= config.eval_test_images <= len(test_images):
    raise UserError(f"eval_test_images={config.eval_test_images}: choose 2 to {len(test_images)}")
  test_x = generative.to_signed_unit(test_images[: config.eval_test_images])
  test_labels = test_labels[: config.eval_test_images]
  train_x = generative.to_signed_unit(train["images"])
  ae = generator.ae
  reconstruct = jax.jit(
    lambda p, x: ae.apply({"params": p}, ae.apply({"params": p}, x, method=ae.encode)[0], method=ae.decode)
  )
  recon = batched_apply(lambda x: reconstruct(generator.ae_params, x), test_x, 500)
  scorer = generative.cached_scorer(
    os.path.join(workdir, CLASSIFIER_FILE), train_x, train["labels"],
    generative.ClassifierConfig(steps=config.classifier_steps),
  )  # fmt: skip
  texts, labels = cd.held_out_prompts(config.eval_samples_per_digit)
  generated = generator(texts, labels, config.seed + np.arange(len(texts)))
  scores = generative.generation_scores(scorer, generated, labels, train_x, test_x, test_labels, config.seed)
  result = {
    "step": generator.step, "autoencoder_step": generator.ae_step, "condition": config.condition,
    "guidance_scale": float(config.guidance_scale), "sampler": config.sampler,
    "sample_steps": int(config.sample_steps), "num_generated": len(generated), **scores,
    "reconstruction_mse": float(np.mean(np.square(recon - test_x))), "scale_factor": float(config.scale_factor),
  }  # fmt: skip
  inception = generative.inception_fid(generated, test_x)
  if inception is not None:
    result["inception_fid"] = inception
  from_checkpoint.report(workdir, result)
  return result
