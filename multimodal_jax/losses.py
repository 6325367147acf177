"""Losses more than one method uses: per-example softmax cross-entropy in float32 and a masked mean.
Pure jnp."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Per-example cross-entropy, computed in float32. logits `[batch, classes]`, labels `[batch]` int."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean of `values [batch]` over the examples where `mask` is nonzero (all when None)."""
  if mask is None:
    return values.mean()
  return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)
