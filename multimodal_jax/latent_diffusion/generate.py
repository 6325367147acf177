"""What latent diffusion does with a trained workdir: `Generator` (prompts, labels and seeds -> images),
and the modes `run_sample`, `run_eval` and `run_export` (`experiments/latent_diffusion` wires them).

Every mode reads the denoiser's saved config: only the keys of `EVAL_KEYS` may differ from training.
`run_eval` generates `eval_samples_per_digit` images per class from the held-out prompts and reports
`conditional_accuracy` (a small CNN trained on the real training images, cached in
`WORKDIR/digit_classifier.npz`, labels them), `fid` (Fréchet distance to the real test images in
that classifier's feature space; `fid_reference` is the same distance for as many real training
images) and the autoencoder's `reconstruction_mse` on the test images (pixels in [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import linen as nn

from multimodal_jax import checkpoint
from multimodal_jax import sharding as shd
from multimodal_jax.arrays import batched_apply
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint, images
from multimodal_jax.latent_diffusion import evaluate as generative
from multimodal_jax.latent_diffusion import pipeline as ldm
from multimodal_jax.latent_diffusion import stages as ldr
from multimodal_jax.latent_diffusion.config import CLASSIFIER_FILE, EVAL_KEYS, RECORDED_KEYS, VAE_SOURCE, stage_dirs
from multimodal_jax.latent_diffusion.data import load_image_set
from multimodal_jax.latent_diffusion.prompts import check_clip_step, make_prompts


class Generator:
  """The trained pipeline of a workdir: prompts, digits and seeds -> images in [-1, 1]."""

  def __init__(self, config, workdir: str):
    _, dn_dir = stage_dirs(workdir)
    config = from_checkpoint.saved_config(dn_dir, config, EVAL_KEYS, recorded=RECORDED_KEYS)
    if not 1 <= config.sample_steps <= config.num_train_timesteps:  # the run's own timesteps
      raise UserError(f"sample_steps={config.sample_steps}: choose 1 to {config.num_train_timesteps}")
    self.config = config
    self.mesh = shd.make_mesh(config.mesh)
    self.data = load_image_set(config)
    self.prompts = make_prompts(config, self.mesh, self.data)
    check_clip_step(config.to_dict(), self.prompts, dn_dir)
    ae, ae_params, self.ae_step = ldr.restore_autoencoder(workdir, self.mesh, config)
    self.ae, self.ae_params = ae, ae_params
    model = ldr.denoiser_model(config, self.prompts, ae)
    init = ldr.denoiser_init(model, self.prompts.inputs(self.data.captions[:1], np.zeros(1)))
    self.step, params = from_checkpoint.restore_params(dn_dir, init, self.mesh, ema=config.denoiser.ema_decay > 0)
    self.sampler = ldm.LatentSampler(
      model, params, ae, ae_params, ldr.make_schedule(config), scale_factor=config.scale_factor,
      prediction=config.prediction, shift_factor=config.shift_factor,
    )  # fmt: skip

  def __call__(self, texts: list[str], labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Images float32 `[n, image_size, image_size, channels]` in [-1, 1] for prompts `texts` (classes
    `labels`), one seed each."""
    c = self.config
    return self.sampler(
      self.prompts.inputs(texts, labels), seeds, seed=c.seed, batch_size=c.eval_batch_size,
      guidance_scale=float(c.guidance_scale), sampler=c.sampler, num_steps=c.sample_steps, eta=float(c.eta),
    )  # fmt: skip


def run_sample(config, workdir: str) -> dict:
  """DIR/samples.png (a grid: one row per prompt, `num_samples` seeds) and each image as DIR/samples/NNNN.png."""
  prompts = [p.strip() for p in config.prompt.split(";") if p.strip()]
  if not prompts:
    raise UserError("--config.prompt is empty: give a prompt such as 'a handwritten digit seven'")
  generator = Generator(config, workdir)
  labels = [generator.prompts.check(p) for p in prompts]
  if generator.config.condition == "class" and min(labels) < 0:
    names = ", ".join(generator.data.class_names)
    raise UserError(
      f"prompt {prompts[labels.index(min(labels))]!r} names no class: condition=class needs one of {names}"
    )
  cols = config.num_samples
  pictures = generator([p for p in prompts for _ in range(cols)], np.repeat(labels, cols),
                       np.tile(config.seed + np.arange(cols), len(prompts)))  # fmt: skip
  path = os.path.join(workdir, "samples.png")
  if jax.process_index() == 0:
    pixels = images.to_uint8(pictures, -1.0, 1.0)
    images.save_png(path, images.grid(pixels, columns=cols))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    for i, picture in enumerate(pixels):
      images.save_png(os.path.join(workdir, "samples", f"{i:04d}.png"), picture)
    c = generator.config
    print(f"wrote {path} and {len(pixels)} images in {workdir}/samples: {len(prompts)} prompt(s) x {cols} seeds, "
          f"guidance {c.guidance_scale}, {c.sampler}-{c.sample_steps}", flush=True)  # fmt: skip
  return {"path": path, "digits": labels}


def run_eval(config, workdir: str) -> dict:
  """The scores of the module docstring, printed and written to DIR/eval.json."""
  generator = Generator(config, workdir)
  config, data = generator.config, generator.data
  test_images, test_labels = data.test_images, data.test_labels
  if not 2 <= config.eval_test_images <= len(test_images):
    raise UserError(f"eval_test_images={config.eval_test_images}: choose 2 to {len(test_images)}")
  test_x = generative.to_signed_unit(test_images[: config.eval_test_images])
  test_labels = test_labels[: config.eval_test_images]
  train_x = generative.to_signed_unit(data.images)  # the classifier sees all the distinct training images
  ae = generator.ae
  reconstruct = jax.jit(
    lambda p, x: ae.apply({"params": p}, ae.apply({"params": p}, x, method=ae.encode)[0], method=ae.decode)
  )
  recon = batched_apply(lambda x: reconstruct(generator.ae_params, x), test_x, 500)
  texts, labels = data.eval_prompts(config.eval_samples_per_digit)
  generated = generator(texts, labels, config.seed + np.arange(len(texts)))
  result = {
    "step": generator.step, "autoencoder_step": generator.ae_step, "condition": config.condition,
    "guidance_scale": float(config.guidance_scale), "sampler": config.sampler,
    "sample_steps": int(config.sample_steps), "num_generated": len(generated),
  }  # fmt: skip
  if data.class_names:
    scorer = generative.cached_scorer(
      os.path.join(workdir, CLASSIFIER_FILE), train_x, data.labels,
      generative.ClassifierConfig(steps=config.classifier_steps, num_classes=data.num_classes),
    )  # fmt: skip
    per_class = "accuracy_per_digit" if data.embedded else "accuracy_per_class"
    result.update(generative.generation_scores(
      scorer, generated, labels, train_x, test_x, test_labels, config.seed, per_class_key=per_class
    ))  # fmt: skip
  result["reconstruction_mse"] = float(np.mean(np.square(recon - test_x)))
  result["scale_factor"] = float(config.scale_factor)
  result["fid_features"] = (
    f"{generative.FEATURE_DIM}-d penultimate layer of a CNN classifier trained on the labels of {data.name}"
    if data.class_names else None
  )  # fmt: skip
  if config.autoencoder_from:
    result["autoencoder_from"] = config.autoencoder_from
  inception = generative.inception_fid(generated, test_x)
  if inception is not None:
    result["inception_fid"] = inception
  from_checkpoint.report(workdir, result)
  return result


def run_export(config, workdir: str) -> dict:
  """`--config.export_to=diffusers_vae:DIR`: the run's autoencoder as a diffusers AutoencoderKL folder,
  with the run's latent scale (the denoiser's, else stage 1's measurement) as its `scaling_factor`."""
  from multimodal_jax.latent_diffusion.diffusers_vae import save_diffusers_vae

  if not config.export_to:
    raise UserError("--mode=export needs --config.export_to=diffusers_vae:DIR (the folder to write)")
  ae_dir, dn_dir = stage_dirs(workdir)
  if checkpoint.saved_steps(dn_dir):
    config = from_checkpoint.saved_config(dn_dir, config, EVAL_KEYS, recorded=RECORDED_KEYS)
  ae, params, step = ldr.restore_autoencoder(workdir, shd.make_mesh(config.mesh), config)
  scale = config.scale_factor if checkpoint.saved_steps(dn_dir) else (ldm.read_scale(ae_dir) or {}).get("scale_factor")
  factors = {"scaling_factor": float(scale) if scale else ae.config.scaling_factor}
  factors["shift_factor"] = float(config.shift_factor) if config.shift_factor else ae.config.shift_factor
  out = config.export_to[len(VAE_SOURCE) :]
  if jax.process_index() == 0:
    save_diffusers_vae(out, nn.meta.unbox(jax.device_get(params)), dataclasses.replace(ae.config, **factors))
    print(f"wrote the autoencoder (step {step}, scaling_factor {factors['scaling_factor']}) to {out}", flush=True)
  return {"path": out, "autoencoder_step": step, **factors}
