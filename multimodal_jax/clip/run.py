"""The run-level pieces of the CLIP experiment (`experiments/clip.py` wires them): the text side's
inputs, evaluation of a trained or imported model on the embedded digits or on any SPEC, restoring
a run's params or importing open_clip weights for evaluation and export. Each mode resolves the
config's auto values once, at its start (`clip.settings.resolve`; evaluation and export from the run's
saved config), and reads the frozen `ClipSettings` from then on; training saves the config with every
auto value written in (`ClipSettings.recorded`) and leaves the caller's config as it was.

Evaluating imported weights needs no checkpoint: `--mode=eval --config.init_from=open_clip:FILE`
on a workdir without one converts the file (checked against the run's model) and evaluates it at
step 0; a workdir with a checkpoint is always evaluated from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from multimodal_jax import checkpoint, cli, init_from, loop, planning, train
from multimodal_jax import sharding as shd
from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import plan as clip_plan
from multimodal_jax.clip import settings as clip_settings
from multimodal_jax.clip import weights as clip_weights
from multimodal_jax.clip.build import build, converters
from multimodal_jax.clip.config import EVAL_KEYS, RULES, get_config
from multimodal_jax.clip.evaluate import evaluate
from multimodal_jax.clip.losses import make_loss_fn
from multimodal_jax.config import check_divisible
from multimodal_jax.data.pipeline import GrainBatches, worker_count
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint


def restore(config: Any, workdir: str, keep: Sequence[str]):
  """(config, settings, mesh, model, text inputs, step, params) of the run in `workdir` (its saved config
  but the `keep` keys, and its `ClipSettings`), or, when the workdir holds no checkpoint and
  `init_from=open_clip:FILE` is set, of the imported weights at step 0 (the command line's config)."""
  imported = clip_settings.open_clip_file(config) is not None and not checkpoint.saved_steps(workdir)
  if not imported:
    config = from_checkpoint.saved_config(workdir, config, keep)
  mesh = shd.make_mesh(config.mesh)
  check_divisible("eval_batch_size", config.eval_batch_size, mesh)
  settings = clip_settings.resolve(config)
  model, text_inputs, init_params = build(settings)
  if imported:
    params = init_from.initial_params(config.init_from, train.abstract_params(init_params, mesh), converters(settings))
    return config, settings, mesh, model, text_inputs, 0, params
  step, params = from_checkpoint.restore_params(workdir, init_params, mesh)
  return config, settings, mesh, model, text_inputs, step, params


def allow_missing_eval_workdir(argv: Sequence[str]) -> None:
  """`--mode=eval --config.init_from=open_clip:FILE` evaluates imported weights and needs no trained
  run: its workdir (where eval.json and predictions.jsonl go) is created when it does not exist."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--workdir")
  parser.add_argument("--mode")
  parser.add_argument("--config.init_from", dest="init_from", default="")
  args, _ = parser.parse_known_args(list(argv))
  imported = args.mode == "eval" and args.init_from.startswith(("open_clip:", "hf-hub:"))
  if imported and args.workdir and "://" not in args.workdir and not os.path.exists(args.workdir):
    try:
      os.makedirs(args.workdir, exist_ok=True)
    except OSError:
      pass  # the command line's own check reports it


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  settings = clip_settings.resolve(config)
  model, text_inputs, init_params = build(settings)
  source, caption_key, dataset = cdata.train_source(config, settings.data)
  images = lambda: dataset if dataset is not None else (r["image"] for r in source)
  settings = settings.with_training_images(config, images)  # image_mean/std=dataset: their statistics
  normalize = settings.normalizer()
  size, chans = settings.image_size, settings.channels
  transform = cdata.make_transform(text_inputs, size, chans, caption_key, label=dataset is None)
  tx, schedule = train.make_optimizer(config, freeze_aliases=clip_weights.FREEZE_ALIASES)
  eval_fn = None
  if dataset is not None and config.eval_dataset:
    eval_fn = lambda params, step: evaluate(model, params, config, settings, mesh, text_inputs, normalize, workdir)
  return loop.fit(
    workdir=workdir,
    # Saved with every auto value written in: evaluation uses what training did, whatever the defaults become.
    config=settings.recorded(config),
    mesh=mesh,
    # An EmbeddingLoss: with grad_accum_steps > 1 the step trains the whole batch's loss (docs/clip_accumulation.md).
    loss_fn=make_loss_fn(model, config, mesh, normalize),
    init_params=init_params,
    tx=tx,
    train_data=GrainBatches(
      source,
      config.batch_size,
      config.seed,
      transform=transform,
      workers=worker_count(config.data_workers, shd.mesh_platform(mesh)),
    ),
    eval_fn=eval_fn,
    learning_rate_fn=schedule,
    converters=converters(settings),
  )


def run_eval(config, workdir):
  config, settings, mesh, model, text_inputs, step, params = restore(config, workdir, EVAL_KEYS)
  normalize = settings.normalizer()
  if not settings.embedded and not config.eval_dataset:
    raise UserError(f"--config.dataset={config.dataset} has no embedded test split: set --config.eval_dataset=SPEC")
  metrics = evaluate(model, params, config, settings, mesh, text_inputs, normalize, workdir)
  result = {"step": step, "loss": config.loss, "text_tower": config.text_tower, **metrics}
  if step == 0 and config.init_from:
    result["init_from"] = config.init_from
  from_checkpoint.report(workdir, result)
  return result


def run_export(config, workdir):
  if not config.export_to:
    raise UserError("--mode=export needs --config.export_to=open_clip:FILE.safetensors")
  config, settings, _, model, _, step, params = restore(config, workdir, EVAL_KEYS)
  path, json_path = clip_weights.export_open_clip(params, model.config, settings.tokenizer, config.export_to)
  print(f"exported step {step} to {path} (open_clip model config: {json_path})", flush=True)


def main(argv=None) -> int:
  allow_missing_eval_workdir(sys.argv[1:] if argv is None else argv)
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval, "export": run_export, "plan": planning.plan_mode(clip_plan.plan_steps)},
    argv,
    prog="python -m experiments.clip",
    rules=RULES,
    relations=[loop.batch_relation(), clip_settings.sources_relation],
    eval_keys=EVAL_KEYS,
  )
