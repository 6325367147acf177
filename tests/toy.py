"""A tiny classification task and model shared by the trainer tests (and the two-process test)."""

from __future__ import annotations

import jax
import numpy as np
import optax

from multimodal_jax.fusion.losses import fusion_loss
from multimodal_jax.layers import MLP

DIM, CLASSES = 16, 4


class ToySource:
  """A grain/TFDS-like random-access source: 512 records `{"x": [16] float32, "label": int64}`."""

  def __init__(self, n: int = 512, seed: int = 0, nan_record: int | None = None):
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(n, DIM)).astype(np.float32)
    w = rng.normal(size=(DIM, CLASSES))
    self.label = (self.x @ w).argmax(-1).astype(np.int64)
    if nan_record is not None:
      self.x[nan_record] = np.nan

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {"x": self.x[i], "label": self.label[i]}


MODEL = MLP(hidden=(32,), out=CLASSES, dropout=0.1)


def loss_fn(params, batch, rng):
  logits = MODEL.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
  return fusion_loss(logits, {}, batch["label"])


def init_params(rng):
  return MODEL.init({"params": rng}, np.zeros((1, DIM), np.float32))["params"]


def optimizer(lr: float = 1e-2):
  schedule = optax.constant_schedule(lr)
  return optax.adamw(schedule), schedule


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def flatten(tree, prefix=()):
  """Yields ("a/b/c", leaf) for a nested dict of arrays."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, prefix + (k,))
    else:
      yield "/".join(prefix + (k,)), v


def fit(workdir, config, mesh="data:4,fsdp:2", source=None, tx=None, **fit_kw):
  """`loop.fit` of the toy task in `workdir` with `config` (a `loop.base_config()`), batches of 32
  from `source` (default ToySource()); `tx` is `(optimizer, schedule)`, default `optimizer()`."""
  from multimodal_jax import loop
  from multimodal_jax import sharding as shd
  from multimodal_jax.data.pipeline import GrainBatches

  optimizer_, schedule = tx or optimizer()
  return loop.fit(
    workdir=str(workdir),
    config=config,
    mesh=shd.make_mesh(mesh),
    loss_fn=loss_fn,
    init_params=init_params,
    tx=optimizer_,
    train_data=GrainBatches(source or ToySource(), 32, seed=3),
    learning_rate_fn=schedule,
    **fit_kw,
  )
