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
import numpy as np
from flax import linen as nn

from multimodal_jax.errors import UserError
from multimodal_jax.fusion.data import NUM_CLASSES, FusionData, modalities_of, model_inputs
from multimodal_jax.fusion.encoders import EncoderHead, encoder_for_shape
from multimodal_jax.layers import MLP, dense, flatten_batch

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


FUSIONS = ("early", "late", "joint", "joint_detached")


def build_model(config, data: FusionData | None = None) -> nn.Module:
  """The fusion model of `config` for `data`'s modalities and classes (default: AV-digits')."""
  if config.fusion not in FUSIONS:
    raise UserError(f"fusion={config.fusion!r}: choose one of {', '.join(FUSIONS)}")
  modalities = modalities_of(config)
  classes = data.num_classes if data is not None else NUM_CLASSES

  def encoder(m):
    shape, by_rank = (data.shapes[m], data.by_rank) if data is not None else ((), False)
    return encoder_for_shape(
      shape, by_rank=by_rank, features=config.features, hidden=config.hidden, dropout=config.dropout
    )

  if len(modalities) == 1 or config.fusion == "late":
    # One modality is the unimodal baseline y = f(x): late fusion of a single predictor.
    return LateFusion(
      predictors={m: EncoderHead(encoder(m), classes) for m in modalities},
      learn_weights=config.late_learn_weights and len(modalities) > 1,
    )
  if config.fusion == "early":
    return EarlyFusion(f=MLP((2 * config.hidden, config.hidden), classes, config.dropout), modalities=modalities)
  if config.fusion == "joint_detached" and not config.unimodal_loss_weight:
    raise UserError("fusion=joint_detached trains each encoder only through its own loss: set unimodal_loss_weight > 0")
  return JointFusion(
    encoders={m: encoder(m) for m in modalities},
    g=MLP((config.hidden,), classes, config.dropout),
    num_classes=classes,
    detach_encoders=config.fusion == "joint_detached",
  )


def make_init_params(model: nn.Module, source, config) -> Callable[[jax.Array], Any]:
  """`init_params(rng) -> params`, shaped by the first record of `source`."""
  example = {k: np.asarray(v)[None] for k, v in source[0].items()}
  modalities = modalities_of(config)

  def init_params(rng):
    return model.init({"params": rng}, model_inputs(example, modalities), train=False)["params"]

  return init_params
