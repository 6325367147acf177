"""Fusion's losses: the fused prediction's cross-entropy plus each modality head's, and the loss_fn of a
config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.arrays import floating_dtype
from multimodal_jax.fusion.data import modalities_of, model_inputs
from multimodal_jax.layers import checkpointed
from multimodal_jax.losses import masked_mean, softmax_cross_entropy


def make_loss_fn(model: nn.Module, config) -> Callable:
  """`loss_fn(params, batch, rng) -> (loss, metrics)`: the fused loss plus the per-modality heads'
  (weighted by `unimodal_loss_weight`), with dropout from `rng`."""
  modalities = modalities_of(config)
  forward = checkpointed(
    lambda params, inputs, rng: model.apply({"params": params}, inputs, train=True, rngs={"dropout": rng}),
    config.get("remat", "none"),
  )

  def loss_fn(params, batch, rng):
    inputs = model_inputs(batch, modalities, dtype=floating_dtype(params))
    logits, aux = forward(params, inputs, rng)
    return fusion_loss(logits, aux, batch["label"], unimodal_weight=config.unimodal_loss_weight)

  return loss_fn


def fusion_loss(
  logits: jnp.ndarray,
  aux: Mapping[str, Any],
  labels: jnp.ndarray,
  mask: jnp.ndarray | None = None,
  unimodal_weight: float = 1.0,
  loss: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
) -> tuple[jnp.ndarray, dict]:
  """Fused loss plus `unimodal_weight` × the mean per-modality loss (when there are heads).

  With JointFusion(detach_encoders=True) the per-modality terms are the encoders' only signal.
  `loss(logits, labels) -> [batch]` defaults to softmax cross-entropy; `mask` weights examples.
  """
  loss = loss or softmax_cross_entropy

  def mean(values):
    return masked_mean(values, mask)

  total = fused = mean(loss(logits, labels))
  metrics = {"fused_loss": fused, "accuracy": mean((logits.argmax(-1) == labels).astype(jnp.float32))}
  per_modality = aux.get("per_modality", {})
  if per_modality and unimodal_weight:
    unimodal = [mean(loss(lg, labels)) for lg in per_modality.values()]
    total = total + unimodal_weight * sum(unimodal) / len(unimodal)
  for m, lg in per_modality.items():
    metrics[f"accuracy_{m}"] = mean((lg.argmax(-1) == labels).astype(jnp.float32))
  return total, metrics
