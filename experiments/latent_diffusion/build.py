"""What training and generation both build from a config: the captioned-digits arrays, the
autoencoder and denoiser models and their init functions, the noise schedule, the two stage
directories, and the trained autoencoder restored from its stage.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.latent_diffusion.prompts import Prompts
from multimodal_jax import checkpoint, diffusion
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.data.pipeline import load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint, generative
from multimodal_jax.models import autoencoder_kl as akl
from multimodal_jax.models.dit import PRESETS as DIT_PRESETS
from multimodal_jax.models.dit import dit_config
from multimodal_jax.models.prompt_encoder import ConditionedDenoiser


def load_data(config):
  return load_on_every_process(lambda: cd.load(config.data_dir or None))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def split_arrays(source) -> tuple[np.ndarray, list[str], np.ndarray]:
  """A whole split: images uint8 `[n, 32, 32, 1]`, captions, labels int64 `[n]`."""
  records = [source[i] for i in range(len(source))]
  return (
    np.stack([r["image"] for r in records]),
    [_text(r["caption"]) for r in records],
    np.asarray([r["label"] for r in records], np.int64),
  )


def unique_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(images, labels, index)` of the distinct training images (each is stored once per caption);
  `index[i]` is the row of record i's image."""
  flat = images.reshape(len(images), -1)
  _, first, index = np.unique(flat, axis=0, return_index=True, return_inverse=True)
  order = np.argsort(first)  # keep the data's order
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return images[first[order]], labels[first[order]], rank[index.reshape(-1)]


class ArraySource:
  """A grain random-access source over equally long numpy arrays: record i = `{k: v[i]}`."""

  def __init__(self, **arrays: np.ndarray):
    self._arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    return {k: v[i] for k, v in self._arrays.items()}


def training_set(config, data) -> dict:
  """The distinct training images (uint8 `images`, `labels`; the first `config.train_images` when
  set) and the caption records on them (`captions`, `index`: each record's image row)."""
  images, captions, labels = split_arrays(data["train"])
  uniq, uniq_labels, index = unique_images(images, labels)
  keep = np.arange(len(index))
  if config.train_images:
    if not 0 < config.train_images <= len(uniq):
      raise UserError(f"train_images={config.train_images}: choose 1 to {len(uniq)} (0: all)")
    uniq, uniq_labels = uniq[: config.train_images], uniq_labels[: config.train_images]
    keep = np.flatnonzero(index < config.train_images)
  return {"images": uniq, "labels": uniq_labels, "captions": [captions[i] for i in keep], "index": index[keep]}


def autoencoder_model(config) -> akl.AutoencoderKL:
  preset = config.autoencoder.preset
  if preset not in akl.PRESETS:
    raise UserError(f"autoencoder.preset={preset!r}: choose one of {', '.join(akl.PRESETS)}")
  return akl.AutoencoderKL(akl.PRESETS[preset])


def denoiser_model(config, prompts: Prompts, ae: akl.AutoencoderKL) -> ConditionedDenoiser:
  if config.dit not in DIT_PRESETS:
    raise UserError(f"dit={config.dit!r}: choose one of {', '.join(DIT_PRESETS)}")
  side = 32 // ae.config.downsampling_factor
  dit = dit_config(
      config.dit, input_size=side, in_channels=ae.config.latent_channels, patch_size=config.patch_size,
      context_dim=prompts.context_dim,
  )  # fmt: skip
  return ConditionedDenoiser(
      dit, prompts.encoder_kind, vocab_size=prompts.vocab_size, context_length=config.context_length,
      num_classes=len(cd.CLASS_NAMES), text_width=config.text_width, text_layers=config.text_layers,
      text_heads=config.text_heads,
  )  # fmt: skip


def denoiser_init(model: ConditionedDenoiser, config, example_inputs: dict):
  side, channels = model.dit.input_size, model.dit.in_channels
  x = jnp.zeros((1, side, side, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  inputs = jax.tree.map(lambda a: jnp.asarray(a[:1]), example_inputs)

  def init_params(rng):
    return model.init({"params": rng}, x, t, inputs)["params"]

  return init_params


def autoencoder_init(model: akl.AutoencoderKL):
  return lambda rng: model.init({"params": rng}, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]


def make_schedule(config) -> diffusion.Schedule:
  if config.schedule not in diffusion.SCHEDULES:
    raise UserError(f"schedule={config.schedule!r}: choose one of {', '.join(diffusion.SCHEDULES)}")
  return diffusion.make_schedule(config.schedule, config.num_train_timesteps)


def make_encode(model: akl.AutoencoderKL):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """`a [n, ...]` with its last row repeated up to `size` rows (one compiled shape for every chunk)."""
  return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a


def batched(fn, arrays: np.ndarray, batch_size: int = 500):
  """`fn` (an array or a tuple of arrays out) over fixed-size chunks of `arrays`, outputs cut back."""
  outs = []
  batch_size = min(batch_size, len(arrays))
  for start in range(0, len(arrays), batch_size):
    chunk = arrays[start : start + batch_size]
    out = jax.device_get(fn(pad_rows(chunk, batch_size)))
    outs.append(
      tuple(np.asarray(o)[: len(chunk)] for o in out) if isinstance(out, tuple) else np.asarray(out)[: len(chunk)]
    )
  return tuple(np.concatenate(parts) for parts in zip(*outs)) if isinstance(outs[0], tuple) else np.concatenate(outs)


def to_signed_unit(x: np.ndarray) -> np.ndarray:
  return generative.to_signed_unit(x)


def stage_dirs(workdir: str) -> tuple[str, str]:
  return os.path.join(workdir, "autoencoder"), os.path.join(workdir, "denoiser")


def restore_autoencoder(config, workdir: str, mesh):
  """`(model, params, step)` of the trained autoencoder; UserError when stage 1 has no checkpoint."""
  ae_dir, _ = stage_dirs(workdir)
  if not checkpoint.saved_steps(ae_dir):
    raise UserError(
      f"no autoencoder checkpoint in {ae_dir}: train stage 1 first (same --workdir, --config.stage=all or "
      "--config.stage=autoencoder)"
    )
  model = autoencoder_model(ml_collections.ConfigDict(checkpoint.read_config(ae_dir)))
  step, params = from_checkpoint.restore_params(ae_dir, autoencoder_init(model), mesh, ema=False)
  return model, params, step
