"""The run-level pieces of the fusion experiment (`experiments/fusion.py` wires them): the model a
config asks for, over its data's modalities and classes; its loss; params initialised from one
record; and the evaluator that also scores the model with each modality zeroed.

`fusion` chooses the model (`multimodal_jax.fusion`): `early` (one MLP over the concatenated
inputs), `late` (a weighted sum of per-modality predictors), `joint` (an MLP over the concatenated
encodings, with per-modality heads) or `joint_detached` (joint, each encoder trained only by its own
modality's loss). One modality is the unimodal baseline whatever `fusion` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from multimodal_jax import sharding as shd
from multimodal_jax.config import check_divisible
from multimodal_jax.data.pipeline import eval_batches
from multimodal_jax.errors import UserError
from multimodal_jax.fusion import EarlyFusion, JointFusion, LateFusion, fusion_loss
from multimodal_jax.fusion_data import NUM_CLASSES, FusionData, modalities_of, model_inputs
from multimodal_jax.layers import MLP
from multimodal_jax.models.fusion_encoders import EncoderHead, encoder_for_shape

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


def make_loss_fn(model: nn.Module, config) -> Callable:
  """`loss_fn(params, batch, rng) -> (loss, metrics)`: the fused loss plus the per-modality heads'
  (weighted by `unimodal_loss_weight`), with dropout from `rng`."""
  modalities = modalities_of(config)

  def loss_fn(params, batch, rng):
    logits, aux = model.apply({"params": params}, model_inputs(batch, modalities), train=True, rngs={"dropout": rng})
    return fusion_loss(logits, aux, batch["label"], unimodal_weight=config.unimodal_loss_weight)

  return loss_fn


def make_init_params(model: nn.Module, source, config) -> Callable[[jax.Array], Any]:
  """`init_params(rng) -> params`, shaped by the first record of `source`."""
  example = {k: np.asarray(v)[None] for k, v in source[0].items()}
  modalities = modalities_of(config)

  def init_params(rng):
    return model.init({"params": rng}, model_inputs(example, modalities), train=False)["params"]

  return init_params


def make_evaluator(model: nn.Module, config, mesh: jax.sharding.Mesh, source) -> Callable:
  """`evaluate(params) -> metrics`: test accuracy, also with each modality zeroed."""
  modalities = modalities_of(config)
  check_divisible("eval_batch_size", config.eval_batch_size, mesh)

  @jax.jit
  def correct(params, batch):
    out = {}
    for zeroed in [()] + [(m,) for m in modalities] * (len(modalities) > 1):
      logits, _ = model.apply({"params": params}, model_inputs(batch, modalities, zeroed), train=False)
      hits = (logits.argmax(-1) == batch["label"]) * batch["mask"]
      out["accuracy" + "".join(f"_without_{m}" for m in zeroed)] = hits.sum()
    out["count"] = batch["mask"].sum()
    return out

  def evaluate(params, step=None):
    del step
    totals = {}
    for batch in eval_batches(source, config.eval_batch_size):
      result = jax.device_get(correct(params, shd.host_to_global_batch(batch, mesh)))
      for k, v in result.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}

  return evaluate
