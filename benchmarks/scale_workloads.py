"""The workloads `benchmarks.scale` compiles: CLIP ViT-B/16 and ViT-L/14 (the experiment's own step, through
`clip.plan.plan_steps`), DiT-XL/2 and AVDCNN `wide`, each with its global batch and meshes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from multimodal_jax import planning


@dataclasses.dataclass
class Workload:
  """A train step to plan: `lower(batch, mesh) -> jax.stages.Lowered` at a global batch."""

  name: str
  devices: int  # the row's device count (8 or 64)
  batch: int
  meshes: tuple[str, ...]
  lower: Callable[[int, jax.sharding.Mesh], object]
  plain_lower: Callable | None = None  # the same step without remat: the model FLOPs an MFU counts


def clip_config(preset: str, batch: int, mesh: str, loss_impl: str = "gather", remat="none"):
  """The CLIP experiment's config of `--config.model=PRESET --config.image_tower=vit
  --config.tokenizer=clip_bpe --config.channels=3`, batch, mesh, loss implementation and remat."""
  from multimodal_jax.clip.config import get_config

  config = get_config()
  config.model, config.image_tower, config.tokenizer, config.channels = preset, "vit", "clip_bpe", 3
  config.batch_size, config.mesh, config.loss_impl = batch, mesh, loss_impl
  if isinstance(config.remat, bool):  # remat before the policy names: a boolean
    config.remat = remat not in (False, "none")
  else:
    config.remat = {False: "none", True: "full"}.get(remat, remat)
  return config


def clip_workload(preset: str, devices: int, batch: int, meshes, loss_impl="gather", remat="none") -> Workload:
  """The CLIP experiment's own train step (`clip.plan.plan_steps`), bfloat16."""
  from multimodal_jax.clip import plan as clip_plan

  (step,) = clip_plan.plan_steps(clip_config(preset, batch, meshes[0], loss_impl, remat), "bfloat16")
  plain = None
  if remat not in (False, "none", ""):
    (plain,) = clip_plan.plan_steps(clip_config(preset, batch, meshes[0], loss_impl, "none"), "bfloat16")
  label = f"CLIP {preset} {loss_impl}" + (f" remat={remat}" if plain else "")
  return Workload(label, devices, batch, tuple(meshes), step.lower, plain.lower if plain else None)


def _optimizer_section():
  """The trainer's optimizer keys (AdamW, warmup + cosine, clipping; weight decay 0.1) for DiT and AVDCNN."""
  from multimodal_jax import loop
  from multimodal_jax.config import make_config

  return make_config(loop.base_keys(weight_decay=0.1))


def dit_workload(devices: int = 8, batch: int = 256, meshes=("fsdp:8",)) -> Workload:
  from multimodal_jax.latent_diffusion import dit

  cfg = dit.dit_config("XL", input_size=32, patch_size=2, context_dim=768, dtype="bfloat16", attention="auto")
  model = dit.DiT(cfg)
  context = 77

  def init_params(rng):
    x, t = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,), jnp.int32)
    return model.init({"params": rng}, x, t, jnp.zeros((1, context, 768)), jnp.ones((1, context), bool))["params"]

  alphas = jnp.cos(jnp.linspace(0.0, 0.5 * math.pi, 1000)) ** 2  # a cosine schedule's alpha-bar

  def loss_fn(params, batch, rng):
    t_key, n_key = jax.random.split(rng)
    x0 = batch["latents"]
    t = jax.random.randint(t_key, (x0.shape[0],), 0, 1000)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    a = alphas[t][:, None, None, None].astype(x0.dtype)
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
    out = model.apply({"params": params}, x_t, t, batch["context"], batch["mask"])
    return jnp.mean(jnp.square(out - noise.astype(jnp.float32))), {}

  def lower(b, mesh):
    shapes = {"latents": ((b, 32, 32, 4), jnp.float32), "context": ((b, context, 768), jnp.float32)}
    shapes["mask"] = ((b, context), jnp.bool_)
    return planning.lower_train_step(mesh, loss_fn, init_params, shapes, dtype="bfloat16", section=_optimizer_section())

  return Workload("DiT-XL/2", devices, batch, tuple(meshes), lower)


def avdcnn_workload(devices: int = 8, batch: int = 4096, meshes=("fsdp:8",)) -> Workload:
  from multimodal_jax.avdcnn import losses as av_losses
  from multimodal_jax.avdcnn import model as avdcnn

  model = avdcnn.AVDCNN(avdcnn.PRESETS["wide"])
  init_params = avdcnn.make_init_params(model)
  loss_fn = av_losses.make_loss_fn(model, mu=1.0, loss="compressed")
  bins, frames = avdcnn.BINS, avdcnn.CONTEXT

  def lower(b, mesh):
    shapes = {
      "audio": ((b, bins, frames), jnp.float32),
      "lips": ((b, frames, *avdcnn.LIPS_SHAPE), jnp.uint8),
      "target": ((b, bins), jnp.float32),
      "mean": ((b, bins), jnp.float32),
      "std": ((b, bins), jnp.float32),
    }
    return planning.lower_train_step(mesh, loss_fn, init_params, shapes, dtype="bfloat16", section=_optimizer_section())

  return Workload("AVDCNN wide", devices, batch, tuple(meshes), lower)


def workloads(remats) -> list[Workload]:
  rows = [clip_workload("ViT-B-16", 8, 4096, ("fsdp:8",), remat=r) for r in remats]
  rows += [clip_workload("ViT-L-14", 64, 32768, ("fsdp:64", "data:8,fsdp:8"), "chunked", remat=r) for r in remats]
  rows += [clip_workload("ViT-B-16", 64, 32768, ("fsdp:64",), "chunked", remat=r) for r in remats]
  return rows + [dit_workload(), avdcnn_workload()]
