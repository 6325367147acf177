"""AVDCNN's modes: train, eval (PESQ / STOI / SDI / segSNR of the test utterances), enhance (files or
folders of noisy speech) and spectrogram (a figure of one test utterance)."""

from __future__ import annotations

import json
import os
import time

import jax

from multimodal_jax import audio, cli, loop, planning, train
from multimodal_jax import sharding as shd
from multimodal_jax.avdcnn import enhance
from multimodal_jax.avdcnn import evaluate as sq
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.avdcnn import plan as avdcnn_plan
from multimodal_jax.avdcnn.config import EVAL_KEYS, RULES, get_config, model_config
from multimodal_jax.avdcnn.data import load_data
from multimodal_jax.avdcnn.frames import FrameSource
from multimodal_jax.avdcnn.losses import make_loss_fn
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.datasets import lips as lips_lib
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  model = avdcnn.AVDCNN(model_config(config))
  started = time.time()
  frames = FrameSource(load_data(config)["train"], config.target_floor)
  print(f"{len(frames)} training frames, features in {time.time() - started:.1f}s", flush=True)

  bn_frames = lambda: frames.sample_batches(config.seed + 1, config.batch_size, config.bn_batches)
  tx, schedule = train.make_optimizer(config)
  result = loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config.mu, config.under_weight, config.loss, config.remat),
    init_params=avdcnn.make_init_params(model),
    tx=tx,
    train_data=GrainBatches(frames, config.batch_size, config.seed, fetch_batches=True),
    learning_rate_fn=schedule,
    model_state_fn=lambda params: avdcnn.population_batch_stats(model, params, bn_frames()),
  )
  if jax.process_index() == 0:
    print(json.dumps({"step": int(result.state.step), "train_seconds": round(time.time() - started, 1)}), flush=True)
  return result


def _inference(config, workdir):
  """`(config, enhancer, step)`: the run's model, params and batch-norm statistics as an Enhancer."""
  config = from_checkpoint.saved_config(workdir, config, EVAL_KEYS)
  return config, *enhance.from_workdir(workdir, avdcnn.AVDCNN(model_config(config)), shd.make_mesh(config.mesh))


def run_eval(config, workdir):
  config, enhancer, step = _inference(config, workdir)
  started, model = time.time(), enhancer.model.config
  fixed = (lambda frames: lips_lib.fixed_mouth(num_frames=frames)) if model.visual else None
  test, rate = load_data(config)["test"], audio.SAMPLE_RATE
  metrics = sq.evaluate(enhancer, test, rate, config.eval_utterances, config.eval_processes, fixed)
  result = {"step": step, "modalities": ",".join(model.modalities), "fusion": model.fusion}
  result = {**result, "eval_seconds": round(time.time() - started, 1), **metrics}
  from_checkpoint.report(workdir, result)
  return result


def run_enhance(config, workdir):
  """Enhances `config.input` (a file, or every audio file of a directory); inputs checked before restoring."""
  visual = model_config(from_checkpoint.saved_config(workdir, config, EVAL_KEYS)).visual
  jobs = enhance.plan(config.input, config.lips, config.output, visual, config.resample)
  _, enhancer, _ = _inference(config, workdir)
  for line in enhance.run(enhancer, jobs):
    print(json.dumps(line), flush=True)


def run_spectrogram(config, workdir):
  """Noisy / enhanced / clean spectrograms of test utterance `utterance` (default WORKDIR/spectrogram.png)."""
  output = config.output or os.path.join(workdir, "spectrogram.png")
  config, enhancer, step = _inference(config, workdir)
  test = load_data(config)["test"]
  if not 0 <= config.utterance < len(test):
    raise UserError(f"utterance={config.utterance}: choose 0 to {len(test) - 1}")
  enhance.plot_example(enhancer, test[config.utterance], f"step {step}", output)
  print(json.dumps({"output": output, "utterance": config.utterance}), flush=True)


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {
      "train": run_train,
      "eval": run_eval,
      "enhance": run_enhance,
      "spectrogram": run_spectrogram,
      "plan": planning.plan_mode(avdcnn_plan.plan_steps),
    },
    argv,
    prog="python -m experiments.avdcnn",
    rules=RULES,
    relations=[loop.batch_relation()],
    eval_keys=EVAL_KEYS,
  )
