"""Early, late and joint fusion over a dict of any number of modalities.

Every module maps `inputs: {modality: [batch, ...]}` to `(logits [batch, classes], aux)` where
`aux` holds per-modality logits (`{modality: [batch, classes]}`) for the variants that have them.
Modalities are always visited in sorted-name order, so the fused layout is deterministic.

- Early:  y = f(x_1 ⊕ … ⊕ x_n)                  (inputs flattened and concatenated)
- Late:   y = Σ_i w_i f_i(x_i)                    (w fixed, or learned as softmax weights)
- Joint:  z = f_1(x_1) ⊕ … ⊕ f_n(x_n), y = g(z)   (`detach_encoders=True` is the seed's variant:
          each f_i learns only from its own head's loss, g gets no gradient path into f_i)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.layers import dense, flatten_batch
from multimodal_jax.losses import masked_mean, softmax_cross_entropy

Inputs = Mapping[str, jnp.ndarray]


def _check_modalities(inputs: Inputs, expected: Mapping[str, Any]) -> list[str]:
  names = sorted(expected)
  if sorted(inputs) != names:
    raise ValueError(f"fusion expects modalities {names}, got {sorted(inputs)}")
  return names


class EarlyFusion(nn.Module):
  """y = f(concat of the flattened inputs). `f` maps `[batch, sum_i d_i]` to logits."""

  f: nn.Module
  modalities: tuple[str, ...]

  @nn.compact
  def __call__(self, inputs: Inputs, train: bool = False):
    names = _check_modalities(inputs, dict.fromkeys(self.modalities))
    x = jnp.concatenate([flatten_batch(inputs[m]) for m in names], axis=-1)
    return self.f(x, train=train), {}


class LateFusion(nn.Module):
  """y = Σ_i w_i f_i(x_i) over per-modality predictors `f_i` (each `[batch, ...]` -> logits).

  `weights` fixes w (defaults to uniform); with `learn_weights` w = softmax(α), α learned.
  """

  predictors: Mapping[str, nn.Module]
  weights: Mapping[str, float] | None = None
  learn_weights: bool = False

  @nn.compact
  def __call__(self, inputs: Inputs, train: bool = False):
    names = _check_modalities(inputs, self.predictors)
    per_modality = {m: self.predictors[m](inputs[m], train=train) for m in names}
    if self.learn_weights:
      alpha = self.param(
        "fusion_logits", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("modalities",)), (len(names),)
      )
      w = jax.nn.softmax(alpha)
    elif self.weights is not None:
      w = jnp.asarray([self.weights[m] for m in names], jnp.float32)
    else:
      w = jnp.full((len(names),), 1.0 / len(names))
    stacked = jnp.stack([per_modality[m] for m in names])  # [modalities, batch, classes]
    fused = jnp.einsum("m,mbc->bc", w.astype(stacked.dtype), stacked)
    return fused, {"per_modality": per_modality, "weights": w}


class JointFusion(nn.Module):
  """z = concat_i f_i(x_i), y = g(z), with per-modality heads h_i(f_i(x_i)).

  `detach_encoders=False`: the joint loss trains the encoders (the usual joint fusion).
  `detach_encoders=True` (the seed's variant): g sees stop_gradient(z); each encoder f_i is
  updated only through its own head h_i, i.e. by the loss of its own modality.
  """

  encoders: Mapping[str, nn.Module]
  g: nn.Module
  num_classes: int
  detach_encoders: bool = False

  @nn.compact
  def __call__(self, inputs: Inputs, train: bool = False):
    names = _check_modalities(inputs, self.encoders)
    features = {m: self.encoders[m](inputs[m], train=train) for m in names}
    per_modality = {m: dense(self.num_classes, ("mlp", "classes"), name=f"head_{m}")(features[m]) for m in names}
    z = jnp.concatenate([features[m] for m in names], axis=-1)
    if self.detach_encoders:
      z = jax.lax.stop_gradient(z)
    return self.g(z, train=train), {"per_modality": per_modality}


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
