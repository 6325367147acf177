"""Sampling from a trained workdir (`Generator`, `--mode=sample`) and its evaluation
(`--mode=eval`: conditional accuracy, FID, the autoencoder's reconstruction error).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.latent_diffusion.build import (
  batched,
  denoiser_init,
  denoiser_model,
  load_data,
  make_schedule,
  pad_rows,
  restore_autoencoder,
  split_arrays,
  stage_dirs,
  to_signed_unit,
  unique_images,
)
from experiments.latent_diffusion.config import CLASSIFIER_FILE, EVAL_KEYS, RECORDED_KEYS
from experiments.latent_diffusion.prompts import Prompts, check_clip_step
from multimodal_jax import diffusion
from multimodal_jax import sharding as shd
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint, generative, images


def _check_sampling(config) -> None:
  if config.sampler not in diffusion.SAMPLERS:
    raise UserError(f"sampler={config.sampler!r}: choose one of {', '.join(diffusion.SAMPLERS)}")
  if not 1 <= config.sample_steps <= config.num_train_timesteps:
    raise UserError(f"sample_steps={config.sample_steps}: choose 1 to {config.num_train_timesteps}")
  if config.guidance_scale < 0:
    raise UserError(f"guidance_scale={config.guidance_scale}: must be >= 0 (1: no guidance, 0: unconditional)")


class Generator:
  """The trained pipeline from a workdir: prompt inputs + initial noise -> images in [-1, 1]."""

  def __init__(self, config, workdir: str):
    _, dn_dir = stage_dirs(workdir)
    config = from_checkpoint.saved_config(dn_dir, config, EVAL_KEYS, recorded=RECORDED_KEYS)
    _check_sampling(config)
    self.config = config
    self.mesh = shd.make_mesh(config.mesh)
    self.prompts = Prompts(config, self.mesh)
    check_clip_step(config.to_dict(), self.prompts, dn_dir)
    self.ae, self.ae_params, self.ae_step = restore_autoencoder(config, workdir, self.mesh)
    self.model = denoiser_model(config, self.prompts, self.ae)
    example = self.prompts.inputs(["a handwritten digit zero"], np.zeros(1))
    init = denoiser_init(self.model, config, example)
    ema = config.denoiser.ema_decay > 0
    self.step, self.params = from_checkpoint.restore_params(dn_dir, init, self.mesh, ema=ema)
    self.schedule = make_schedule(config)
    self.latent_shape = (self.model.dit.input_size, self.model.dit.input_size, self.model.dit.in_channels)
    self._generate = jax.jit(self._generate_fn, static_argnames=("guidance_scale", "sampler", "num_steps", "eta"))

  def _generate_fn(self, params, ae_params, inputs, x_T, rng, *, guidance_scale, sampler, num_steps, eta):
    model, config = self.model, self.config
    context, mask = model.apply({"params": params}, inputs, method=model.encode_prompt)

    def apply_fn(x, t, cond):
      return model.apply({"params": params}, x, t, cond[0], cond[1], method=model.denoise)

    null = (jnp.zeros_like(context[:1]), jnp.zeros_like(mask[:1]))
    model_fn = diffusion.guided_model_fn(apply_fn, (context, mask), null, guidance_scale)
    z = diffusion.sample(
      model_fn, self.schedule, x_T, rng, sampler=sampler, num_steps=num_steps, eta=eta, prediction=config.prediction
    )
    decoded = self.ae.apply({"params": ae_params}, z / config.scale_factor, method=self.ae.decode)
    return jnp.clip(decoded, -1.0, 1.0)

  def noise(self, seeds: np.ndarray) -> np.ndarray:
    """Initial latents `[n, h, w, c]`, sample i from `key(seeds[i])` (independent of batching)."""
    draw = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), self.latent_shape, jnp.float32))
    return np.asarray(draw(jnp.asarray(seeds, jnp.uint32)))

  def __call__(self, texts: list[str], labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Images float32 `[n, 32, 32, 1]` in [-1, 1] for prompts `texts` (digits `labels`), one seed each."""
    config = self.config
    inputs = self.prompts.inputs(texts, labels)
    noise = self.noise(seeds)
    batch = min(config.eval_batch_size, len(texts))
    out = []
    for start in range(0, len(texts), batch):
      n = min(batch, len(texts) - start)
      chunk = {k: pad_rows(v[start : start + n], batch) for k, v in inputs.items()}
      x = self._generate(
          self.params, self.ae_params, chunk, pad_rows(noise[start : start + n], batch),
          jax.random.key(config.seed + start), guidance_scale=float(config.guidance_scale), sampler=config.sampler,
          num_steps=config.sample_steps, eta=float(config.eta),
      )  # fmt: skip
      out.append(np.asarray(jax.device_get(x))[:n])
    return np.concatenate(out)


def run_sample(config, workdir: str) -> dict:
  prompts = [p.strip() for p in config.prompt.split(";") if p.strip()]
  if not prompts:
    raise UserError("--config.prompt is empty: give a prompt such as 'a handwritten digit seven'")
  if config.num_samples < 1:
    raise UserError(f"num_samples={config.num_samples}: must be at least 1")
  generator = Generator(config, workdir)
  labels = [generator.prompts.check(p) for p in prompts]
  cols = config.num_samples
  texts = [p for p in prompts for _ in range(cols)]
  seeds = np.tile(config.seed + np.arange(cols), len(prompts))
  pictures = generator(texts, np.repeat(labels, cols), seeds)
  path = os.path.join(workdir, "samples.png")
  if jax.process_index() == 0:
    images.save_png(path, images.grid(images.to_uint8(pictures, -1.0, 1.0), columns=cols))
    print(
      f"wrote {path}: {len(prompts)} prompt(s) x {cols} seeds, guidance {generator.config.guidance_scale}, "
      f"{generator.config.sampler}-{generator.config.sample_steps}",
      flush=True,
    )
  return {"path": path, "digits": labels}


def eval_prompts(per_digit: int) -> tuple[list[str], np.ndarray]:
  """`per_digit` prompts per digit from the held-out caption templates (cycled), and their digits."""
  texts, labels = [], []
  for digit in range(len(cd.CLASS_NAMES)):
    for k in range(per_digit):
      texts.append(cd.caption(cd.HELD_OUT_TEMPLATES[k % len(cd.HELD_OUT_TEMPLATES)], digit))
      labels.append(digit)
  return texts, np.asarray(labels)


def run_eval(config, workdir: str) -> dict:
  if config.eval_samples_per_digit < 1:
    raise UserError(f"eval_samples_per_digit={config.eval_samples_per_digit}: must be at least 1")
  generator = Generator(config, workdir)
  config = generator.config
  data = load_data(config)
  train_images, _, train_labels = split_arrays(data["train"])
  train_images, train_labels, _ = unique_images(train_images, train_labels)  # the classifier sees all of them
  test_images, _, test_labels = split_arrays(data["test"])
  if not 2 <= config.eval_test_images <= len(test_images):
    raise UserError(f"eval_test_images={config.eval_test_images}: choose 2 to {len(test_images)}")
  test_images, test_labels = test_images[: config.eval_test_images], test_labels[: config.eval_test_images]
  test_x, train_x = to_signed_unit(test_images), to_signed_unit(train_images)

  ae, ae_params = generator.ae, generator.ae_params
  reconstruct = jax.jit(
    lambda p, x: ae.apply({"params": p}, ae.apply({"params": p}, x, method=ae.encode)[0], method=ae.decode)
  )
  recon = batched(lambda x: reconstruct(ae_params, x), test_x)
  reconstruction_mse = float(np.mean(np.square(recon - test_x)))

  scorer = generative.cached_scorer(
      os.path.join(workdir, CLASSIFIER_FILE), train_x, train_labels,
      generative.ClassifierConfig(steps=config.classifier_steps),
  )  # fmt: skip
  texts, labels = eval_prompts(config.eval_samples_per_digit)
  seeds = config.seed + np.arange(len(texts))
  generated = generator(texts, labels, seeds)
  predicted = scorer.predict(generated)
  test_features = scorer.features(test_x)
  reference = np.random.default_rng(config.seed).choice(len(train_x), min(len(generated), len(train_x)), replace=False)
  result = {
    "step": generator.step,
    "autoencoder_step": generator.ae_step,
    "condition": config.condition,
    "guidance_scale": float(config.guidance_scale),
    "sampler": config.sampler,
    "sample_steps": int(config.sample_steps),
    "num_generated": len(generated),
    "conditional_accuracy": generative.conditional_accuracy(predicted, labels),
    "accuracy_per_digit": [float(np.mean(predicted[labels == d] == d)) for d in range(len(cd.CLASS_NAMES))],
    "fid": generative.fid(scorer.features(generated), test_features),
    "fid_reference": generative.fid(scorer.features(train_x[reference]), test_features),
    "reconstruction_mse": reconstruction_mse,
    "classifier_test_accuracy": scorer.accuracy(test_x, test_labels),
    "scale_factor": float(config.scale_factor),
  }
  inception = generative.inception_fid(generated, test_x)
  if inception is not None:
    result["inception_fid"] = inception
  from_checkpoint.report(workdir, result)
  return result
