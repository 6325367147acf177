"""AVDCNN audio-visual speech enhancement (Hou et al. 2018) on the embedded AV-speech data (or GRID).

  python -m experiments.avdcnn --workdir runs/avdcnn                  # train (resumes if DIR has a checkpoint)
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=eval      # PESQ / STOI / SDI / segSNR, eval.json
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=enhance \\
      --config.input=noisy.wav --config.lips=mouth.npy --config.output=enhanced.wav
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=enhance \\
      --config.input=NOISY_DIR --config.lips=LIPS_DIR --config.output=OUT_DIR   # every audio file, STEM.npy lips
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=spectrogram --config.output=docs/avdcnn_spectrogram.png

Keys: see `get_config` (grid_dir: train and test on GRID; noise_dir: mix in your own noise files).
Pieces: `data/frames.py`, `models/avdcnn.py`, `losses.py`, `enhance.py`, `eval/speech_quality.py`;
results and the recipe's history: docs/results/avdcnn.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import ml_collections

from multimodal_jax import audio, cli, enhance, loop, losses, train
from multimodal_jax import sharding as shd
from multimodal_jax.config import BOOL, FINITE, NON_NEGATIVE, POSITIVE, TEXT, existing_path, one_of
from multimodal_jax.data import lips as lips_lib
from multimodal_jax.data.frames import FrameSource
from multimodal_jax.data.pipeline import GrainBatches, load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.eval import speech_quality as sq
from multimodal_jax.models import avdcnn

EVAL_KEYS = ("mesh", "data_dir", "eval_utterances", "eval_processes", "input", "lips", "output", "resample", "utterance")  # fmt: skip


def get_config() -> ml_collections.ConfigDict:
  c = loop.base_config(steps=4000, batch_size=256, log_every=100, checkpoint_every=500, keep_checkpoints=2)
  c.modalities = "audio,visual"
  c.fusion = "joint"
  c.model = "paper"  # preset of models/avdcnn.py: paper | wide | tiny
  c.mu = 1.0
  c.loss = "compressed"  # compressed (|S|^0.3 magnitudes, default) | log_power (the paper's)
  c.under_weight = 1.0  # weight of squared audio errors below the target (over-suppression); 1: the paper's loss
  c.head = "gain"  # audio head: gain (noisy centre frame - softplus, default) | residual | plain (the paper's)
  c.target_floor = -4.0  # floor of the normalized clean target (digital silence would be ~ -10)
  c.bn_batches = 16  # training batches for the population batch-norm statistics
  c.data_config = "default"  # av_speech config: default | tiny
  c.data_dir = ""
  c.grid_dir = ""  # a GRID corpus root (multimodal_jax.data.grid): train and test on GRID instead
  c.noise_dir = ""  # audio files to mix the training data with (instead of the Debian packages' noises)
  c.eval_utterances = 0  # 0: every test utterance
  c.eval_processes = 2
  c.input = ""  # enhance mode: a file or a directory of audio files
  c.lips = ""  # its .npy mouth frames, or a directory of STEM.npy
  c.output = ""  # a file, or a directory for a directory of inputs
  c.resample = True
  c.utterance = 0  # spectrogram mode: which test utterance
  return c


RULES = {
  **loop.base_rules(),
  "modalities": one_of("audio,visual", "visual,audio", "audio"),
  "fusion": one_of(*avdcnn.FUSIONS),
  "model": one_of(*avdcnn.PRESETS),
  "mu": NON_NEGATIVE,
  "loss": one_of("compressed", "log_power"),
  "under_weight": NON_NEGATIVE,
  "head": one_of(*avdcnn.HEADS),
  "target_floor": FINITE,
  "bn_batches": POSITIVE,
  "data_config": one_of("default", "tiny"),
  "data_dir": TEXT,
  "grid_dir": existing_path("dir"),
  "noise_dir": existing_path("dir"),
  "eval_utterances": NON_NEGATIVE,
  "eval_processes": POSITIVE,
  "input": TEXT,  # checked by enhance.plan (a file or a directory)
  "lips": TEXT,
  "output": TEXT,
  "resample": BOOL,
  "utterance": NON_NEGATIVE,
}


def model_config(config) -> avdcnn.AVDCNNConfig:
  """The model of `config` (the rules have checked each choice)."""
  modalities = tuple(m for m in avdcnn.MODALITIES if m in config.modalities.split(","))
  return dataclasses.replace(
    avdcnn.PRESETS[config.model], modalities=modalities, fusion=config.fusion, head=config.head
  )


def make_loss_fn(model: avdcnn.AVDCNN, mu: float, under_weight: float = 1.0, loss: str = "log_power"):
  """`losses.avdcnn_loss` of the normalized log-power frames (the paper's) or their compressed magnitudes."""

  def loss_fn(params, batch, rng):
    out = avdcnn.apply_train(model, params, batch, rng)
    visual_target = avdcnn.lips_target(batch["lips"]) if model.config.visual else None
    prediction, target = out["audio"], batch["target"]
    if loss == "compressed":
      prediction = losses.compressed_magnitude(prediction, batch["mean"], batch["std"])
      target = losses.compressed_magnitude(target, batch["mean"], batch["std"])
    return losses.avdcnn_loss(prediction, target, out.get("visual"), visual_target, mu, under_weight)

  return loss_fn


def _load_data(config):
  from multimodal_jax.data import av_speech, grid

  data_dir, noise_dir, sizes = config.data_dir or None, config.noise_dir or None, config.data_config
  if config.grid_dir:
    return load_on_every_process(lambda: grid.load(config.grid_dir, data_dir, noise_config=sizes, noise_dir=noise_dir))
  return load_on_every_process(lambda: av_speech.load(data_dir, config=sizes, noise_dir=noise_dir))


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  model = avdcnn.AVDCNN(model_config(config))
  started = time.time()
  frames = FrameSource(_load_data(config)["train"], config.target_floor)
  print(f"{len(frames)} training frames, features in {time.time() - started:.1f}s", flush=True)

  bn_frames = lambda: frames.sample_batches(config.seed + 1, config.batch_size, config.bn_batches)
  tx, schedule = train.make_optimizer(config)
  result = loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config.mu, config.under_weight, config.loss),
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
  test, rate = _load_data(config)["test"], audio.SAMPLE_RATE
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
  test = _load_data(config)["test"]
  if not 0 <= config.utterance < len(test):
    raise UserError(f"utterance={config.utterance}: choose 0 to {len(test) - 1}")
  enhance.plot_example(enhancer, test[config.utterance], f"step {step}", output)
  print(json.dumps({"output": output, "utterance": config.utterance}), flush=True)


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval, "enhance": run_enhance, "spectrogram": run_spectrogram},
    argv,
    prog="python -m experiments.avdcnn",
    rules=RULES,
    relations=[loop.batch_relation()],
    eval_keys=EVAL_KEYS,
  )


if __name__ == "__main__":
  sys.exit(main())
