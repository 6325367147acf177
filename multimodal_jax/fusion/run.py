"""Fusion's modes: train (`loop.fit` over the data, model, loss and evaluator of a config) and eval
(the latest checkpoint's params on the test split, written to eval.json)."""

from __future__ import annotations

import json

import jax

from multimodal_jax import cli, loop, planning, train
from multimodal_jax import sharding as shd
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.fusion import plan as fusion_plan
from multimodal_jax.fusion.config import EVAL_KEYS, RULES, get_config
from multimodal_jax.fusion.data import load_data, modalities_of, modalities_relation
from multimodal_jax.fusion.evaluate import make_evaluator
from multimodal_jax.fusion.losses import make_loss_fn
from multimodal_jax.fusion.model import build_model, make_init_params


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  data = load_data(config)
  model = build_model(config, data)
  tx, schedule = train.make_optimizer(config)
  result = loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config),
    init_params=make_init_params(model, data.train, config),
    tx=tx,
    train_data=GrainBatches(data.train, config.batch_size, config.seed),
    eval_fn=make_evaluator(model, config, mesh, data.test),
    learning_rate_fn=schedule,
  )
  if jax.process_index() == 0 and result.eval_metrics:
    print(json.dumps({"step": config.steps, **result.eval_metrics}), flush=True)
  return result


def run_eval(config, workdir):
  config = from_checkpoint.saved_config(workdir, config, EVAL_KEYS)
  mesh = shd.make_mesh(config.mesh)
  data = load_data(config)
  model = build_model(config, data)
  step, params = from_checkpoint.restore_params(workdir, make_init_params(model, data.train, config), mesh)
  metrics = make_evaluator(model, config, mesh, data.test)(params)
  result = {"step": step, "fusion": config.fusion, "modalities": ",".join(modalities_of(config)), **metrics}
  from_checkpoint.report(workdir, result)
  return result


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval, "plan": planning.plan_mode(fusion_plan.plan_steps)},
    argv,
    prog="python -m experiments.fusion",
    rules=RULES,
    relations=[loop.batch_relation(), modalities_relation],
    eval_keys=EVAL_KEYS,
  )
