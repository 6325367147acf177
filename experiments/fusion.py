"""AV-digits fusion: handwritten digits (degraded) + spoken digits (noisy), fused early, late or jointly.

  python -m experiments.fusion --workdir /tmp/fusion                 # train (resumes if DIR has a checkpoint)
  python -m experiments.fusion --workdir /tmp/fusion --mode=eval     # evaluate the latest checkpoint

Keys: fusion=early|late|joint|joint_detached (the seed's joint variant: each encoder learns only
from its own modality's loss), modalities=image,audio (one name = the unimodal baseline), steps,
batch_size (global), seed, mesh (e.g. data:4,fsdp:2). Results of the default config: README.md.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from multimodal_jax import cli, loop, train
from multimodal_jax import sharding as shd
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, check_divisible, comma_list_of, one_of
from multimodal_jax.data import av_digits
from multimodal_jax.data.pipeline import GrainBatches, eval_batches, load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.fusion import EarlyFusion, JointFusion, LateFusion, fusion_loss
from multimodal_jax.layers import MLP, ConvEncoder, dense

MODALITIES = ("audio", "image")
FUSIONS = ("early", "late", "joint", "joint_detached")
NUM_CLASSES = 10
# Keys that may differ between training and evaluating a checkpoint; the rest come from it.
EVAL_KEYS = ("mesh", "data_dir", "eval_batch_size")


def get_config() -> ml_collections.ConfigDict:
  """Fusion of AV-digits images and spoken digits (see the module docstring)."""
  c = loop.base_config(
    learning_rate=2e-3, warmup_steps=50, weight_decay=1e-4, eval_every=500, checkpoint_every=250, log_every=50
  )
  c.fusion = "joint"
  c.modalities = "image,audio"
  c.eval_batch_size = 200
  c.features = 64  # width of each modality's encoding
  c.hidden = 128
  c.dropout = 0.1
  c.late_learn_weights = True
  c.unimodal_loss_weight = 1.0  # per-modality head losses (joint and late fusion)
  c.data_dir = ""  # TFDS data dir; empty: the TFDS default
  return c


RULES = {
  **loop.base_rules(),
  "fusion": one_of(*FUSIONS),
  "modalities": comma_list_of(*MODALITIES),
  "eval_batch_size": POSITIVE,
  "features": POSITIVE,
  "hidden": POSITIVE,
  "dropout": Rule(lambda v: 0 <= v < 1, "a probability in [0, 1)"),
  "late_learn_weights": BOOL,
  "unimodal_loss_weight": NON_NEGATIVE,
  "data_dir": TEXT,
}


def modalities_of(config) -> tuple[str, ...]:
  names = tuple(sorted({m.strip() for m in config.modalities.split(",") if m.strip()}))
  unknown = [m for m in names if m not in MODALITIES]
  if not names or unknown:
    raise UserError(f"modalities={config.modalities!r}: choose a comma list from {', '.join(MODALITIES)}")
  return names


class EncoderHead(nn.Module):
  """f_i(x_i): a modality's encoder followed by a linear classifier."""

  encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return dense(self.num_classes, ("mlp", "classes"), name="head")(self.encoder(x, train=train))


def build_model(config) -> nn.Module:
  if config.fusion not in FUSIONS:
    raise UserError(f"fusion={config.fusion!r}: choose one of {', '.join(FUSIONS)}")
  modalities = modalities_of(config)

  def encoder():
    return ConvEncoder(channels=(16, 32), features=config.features, dropout=config.dropout)

  if len(modalities) == 1 or config.fusion == "late":
    # One modality is the unimodal baseline y = f(x): late fusion of a single predictor.
    return LateFusion(
      predictors={m: EncoderHead(encoder(), NUM_CLASSES) for m in modalities},
      learn_weights=config.late_learn_weights and len(modalities) > 1,
    )
  if config.fusion == "early":
    return EarlyFusion(f=MLP((2 * config.hidden, config.hidden), NUM_CLASSES, config.dropout), modalities=modalities)
  if config.fusion == "joint_detached" and not config.unimodal_loss_weight:
    raise UserError("fusion=joint_detached trains each encoder only through its own loss: set unimodal_loss_weight > 0")
  return JointFusion(
    encoders={m: encoder() for m in modalities},
    g=MLP((config.hidden,), NUM_CLASSES, config.dropout),
    num_classes=NUM_CLASSES,
    detach_encoders=config.fusion == "joint_detached",
  )


def model_inputs(batch, modalities, zeroed: tuple[str, ...] = ()) -> dict:
  """The model's inputs from a batch: images scaled to [0, 1]; `zeroed` modalities set to 0."""
  inputs = {}
  for m in modalities:
    x = batch[m].astype(jnp.float32)
    if m == "image":
      x = x / 255.0
    inputs[m] = jnp.zeros_like(x) if m in zeroed else x
  return inputs


def make_loss_fn(model, config):
  modalities = modalities_of(config)

  def loss_fn(params, batch, rng):
    logits, aux = model.apply({"params": params}, model_inputs(batch, modalities), train=True, rngs={"dropout": rng})
    return fusion_loss(logits, aux, batch["label"], unimodal_weight=config.unimodal_loss_weight)

  return loss_fn


def make_init_params(model, source, config):
  example = {k: np.asarray(v)[None] for k, v in source[0].items()}
  modalities = modalities_of(config)

  def init_params(rng):
    return model.init({"params": rng}, model_inputs(example, modalities), train=False)["params"]

  return init_params


def make_evaluator(model, config, mesh, source):
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


def _load_data(config):
  return load_on_every_process(lambda: av_digits.load(config.data_dir or None))


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  data = _load_data(config)
  model = build_model(config)
  tx, schedule = train.make_optimizer(config)
  result = loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config),
    init_params=make_init_params(model, data["train"], config),
    tx=tx,
    train_data=GrainBatches(data["train"], config.batch_size, config.seed),
    eval_fn=make_evaluator(model, config, mesh, data["test"]),
    learning_rate_fn=schedule,
  )
  if jax.process_index() == 0 and result.eval_metrics:
    print(json.dumps({"step": config.steps, **result.eval_metrics}), flush=True)
  return result


def run_eval(config, workdir):
  config = from_checkpoint.saved_config(workdir, config, EVAL_KEYS)
  mesh = shd.make_mesh(config.mesh)
  data = _load_data(config)
  model = build_model(config)
  step, params = from_checkpoint.restore_params(workdir, make_init_params(model, data["train"], config), mesh)
  metrics = make_evaluator(model, config, mesh, data["test"])(params)
  result = {"step": step, "fusion": config.fusion, "modalities": ",".join(modalities_of(config)), **metrics}
  from_checkpoint.report(workdir, result)
  return result


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval},
    argv,
    prog="python -m experiments.fusion",
    rules=RULES,
    relations=[loop.batch_relation()],
    eval_keys=EVAL_KEYS,
  )


if __name__ == "__main__":
  sys.exit(main())
