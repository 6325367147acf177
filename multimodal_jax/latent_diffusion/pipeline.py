"""Latent diffusion's pipeline pieces, between the models (an `AutoencoderKL` and a
`ConditionedDenoiser`) and an experiment's wiring:

* the training images: distinct images of a captioned split (each image is stored once per caption)
  and the caption records on them;
* their posterior latents under a trained autoencoder, computed once per autoencoder step and cached
  (`LATENTS_FILE`), and the latent scale factor measured from them (`SCALE_FILE`);
* `denoiser_loss`: eps/v/x0 prediction over batches of precomputed posteriors and prompt indices;
* `LatentSampler`: prompt inputs and seeds -> images, through guided DDPM/DDIM sampling and the decoder.

The rest of the pipeline: prompts per condition in `latent_diffusion_prompts`, the images in
`latent_diffusion_data`, the models and the two training stages in `latent_diffusion_run`, sampling,
evaluation and export of a trained run in `latent_diffusion_generate`, the config's rules in
`latent_diffusion_config`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import files
from multimodal_jax.arrays import batched_apply
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion import autoencoder_kl as akl
from multimodal_jax.latent_diffusion import diffusion
from multimodal_jax.latent_diffusion.evaluate import to_signed_unit

LATENTS_FILE = "latents.npz"
SCALE_FILE = "latent_scale.json"


def split_arrays(source) -> tuple[np.ndarray, list[str], np.ndarray]:
  """A whole captioned split: images uint8 `[n, 32, 32, 1]`, captions, labels int64 `[n]`."""
  records = [source[i] for i in range(len(source))]
  return (
    np.stack([r["image"] for r in records]),
    [r["caption"] for r in records],
    np.asarray([r["label"] for r in records], np.int64),
  )


def unique_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(images, labels, index)` of the distinct images, in the order they first appear; `index[i]` is
  the row of record i's image."""
  # A dict keyed by each image's bytes: one pass, ~20 ms for the 8,000 digits where np.unique(axis=0)
  # (a lexicographic sort of the rows) took 1.4 s at the start of every latent diffusion command.
  seen: dict[bytes, int] = {}
  first: list[int] = []
  index = np.empty(len(images), np.int64)
  for i, row in enumerate(np.ascontiguousarray(images).reshape(len(images), -1)):
    key = row.tobytes()
    j = seen.get(key)
    if j is None:
      j = seen[key] = len(first)
      first.append(i)
    index[i] = j
  rows = np.asarray(first, np.int64)
  return images[rows], labels[rows], index


def training_set(source, limit: int = 0) -> dict:
  """The distinct images of a captioned split (uint8 `images`, `labels`; the first `limit` when set)
  and the caption records on them (`captions`, `index`: each record's image row)."""
  images, captions, labels = split_arrays(source)
  uniq, uniq_labels, index = unique_images(images, labels)
  keep = np.arange(len(index))
  if limit:
    if not 0 < limit <= len(uniq):
      raise UserError(f"train_images={limit}: choose 1 to {len(uniq)} (0: all)")
    uniq, uniq_labels = uniq[:limit], uniq_labels[:limit]
    keep = np.flatnonzero(index < limit)
  return {"images": uniq, "labels": uniq_labels, "captions": [captions[i] for i in keep], "index": index[keep]}


def training_latents(ae_dir: str, step: int, model: akl.AutoencoderKL, params, images: np.ndarray):
  """Posterior `(mean, logvar)` of uint8 `images` under the autoencoder at `step`, computed once and
  cached in `ae_dir/LATENTS_FILE` (recomputed when the step or the number of images differs)."""
  path = os.path.join(ae_dir, LATENTS_FILE)
  if os.path.isfile(path):
    cached, meta = files.load_tree(path)
    if meta.get("step") == step and len(cached["mean"]) == len(images):
      return cached["mean"], cached["logvar"]
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  mean, logvar = batched_apply(lambda x: encode(params, x), to_signed_unit(images), 500)
  if jax.process_index() == 0:
    files.save_tree(path, {"mean": mean, "logvar": logvar}, {"step": step})
  return mean, logvar


def read_scale(ae_dir: str) -> dict | None:
  """`{"step", "scale_factor"}` measured after training the autoencoder in `ae_dir`, or None."""
  path = os.path.join(ae_dir, SCALE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_scale(ae_dir: str, step: int, scale: float) -> None:
  if jax.process_index() == 0:
    files.write_json(os.path.join(ae_dir, SCALE_FILE), {"step": step, "scale_factor": scale}, indent=None)
    print(f"latent scale factor {scale:.5f} (1 / std of the training latents) in {ae_dir}/{SCALE_FILE}", flush=True)


def denoiser_loss(
  model, schedule: diffusion.Schedule, table: dict, *, scale_factor, cond_drop_prob, prediction, shift_factor=0.0
):
  """loss_fn over batches of precomputed posteriors (`latent_mean`, `latent_std`) and prompt indices
  (`prompt`) into `table` (the prompt inputs of every distinct training caption): a posterior sample,
  shifted by `-shift_factor` (a pretrained VAE's, else 0) and scaled, noised at a random timestep; the prompt dropped with `cond_drop_prob` (classifier-free
  guidance learns the unconditional model too)."""
  table = jax.tree.map(jnp.asarray, table)

  def loss_fn(params, batch, rng):
    post_key, drop_key, diff_key = jax.random.split(rng, 3)
    mean, std = batch["latent_mean"], batch["latent_std"]
    z = mean + std * jax.random.normal(post_key, mean.shape, mean.dtype)
    if shift_factor:
      z = z - shift_factor
    z = z * scale_factor
    inputs = jax.tree.map(lambda a: a[batch["prompt"]], table)
    context, mask = model.apply({"params": params}, inputs, method=model.encode_prompt)
    mask = diffusion.drop_condition(drop_key, mask, cond_drop_prob)

    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, context.astype(x_t.dtype), mask, method=model.denoise)

    return diffusion.diffusion_loss(model_fn, schedule, z, diff_key, prediction)

  return loss_fn


class LatentSampler:
  """Prompt inputs + one seed per image -> images float32 `[n, H, W, C]` in [-1, 1]: guided sampling
  of latents with the denoiser (`model`, `params`), divided by `scale_factor`, decoded by the
  autoencoder (`ae`, `ae_params`) after adding `shift_factor` back."""

  def __init__(
    self, model, params, ae: akl.AutoencoderKL, ae_params, schedule, *, scale_factor, prediction, shift_factor=0.0
  ):
    self.model, self.params, self.ae, self.ae_params = model, params, ae, ae_params
    self.schedule, self.scale_factor, self.prediction = schedule, scale_factor, prediction
    self.shift_factor = float(shift_factor)
    self.latent_shape = (model.dit.input_size, model.dit.input_size, model.dit.in_channels)
    self._generate = jax.jit(self._generate_fn, static_argnames=("guidance_scale", "sampler", "num_steps", "eta"))

  def _generate_fn(self, params, ae_params, inputs, x_T, rng, *, guidance_scale, sampler, num_steps, eta):
    model = self.model
    context, mask = model.apply({"params": params}, inputs, method=model.encode_prompt)

    def apply_fn(x, t, cond):
      return model.apply({"params": params}, x, t, cond[0], cond[1], method=model.denoise)

    null = (jnp.zeros_like(context[:1]), jnp.zeros_like(mask[:1]))
    model_fn = diffusion.guided_model_fn(apply_fn, (context, mask), null, guidance_scale)
    z = diffusion.sample(
      model_fn, self.schedule, x_T, rng, sampler=sampler, num_steps=num_steps, eta=eta, prediction=self.prediction
    )
    z = z / self.scale_factor
    if self.shift_factor:
      z = z + self.shift_factor
    decoded = self.ae.apply({"params": ae_params}, z, method=self.ae.decode)
    return jnp.clip(decoded, -1.0, 1.0)

  def noise(self, seeds: np.ndarray) -> np.ndarray:
    """Initial latents `[n, h, w, c]`, sample i from `key(seeds[i])` (independent of batching)."""
    draw = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), self.latent_shape, jnp.float32))
    return np.asarray(draw(jnp.asarray(seeds, jnp.uint32)))

  def __call__(self, inputs: dict, seeds: np.ndarray, *, seed: int, batch_size: int, **sampling: Any) -> np.ndarray:
    """Images for prompt inputs `[n, ...]` and `seeds [n]`, in batches of `batch_size`; the batch starting
    at row r samples with `key(seed + r)`. `sampling`: guidance_scale, sampler, num_steps, eta."""

    def generate(chunk):
      rng = jax.random.key(seed + int(chunk["row"][0]))
      return self._generate(self.params, self.ae_params, chunk["inputs"], chunk["noise"], rng, **sampling)

    rows = np.arange(len(seeds))
    return batched_apply(generate, {"inputs": inputs, "noise": self.noise(seeds), "row": rows}, batch_size)
