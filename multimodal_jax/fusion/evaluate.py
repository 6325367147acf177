"""Fusion's evaluator: test accuracy of the fused model, and with each modality zeroed (what each modality
contributes)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import linen as nn

from multimodal_jax import sharding as shd
from multimodal_jax.config import check_divisible
from multimodal_jax.data.pipeline import eval_batches
from multimodal_jax.fusion.data import modalities_of, model_inputs


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
