"""AVDCNN's config: every key with its default and rule, the keys an evaluation may change, and the
model a config asks for."""

from __future__ import annotations

import dataclasses

import ml_collections

from multimodal_jax import loop
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.config import BOOL, FINITE, NON_NEGATIVE, POSITIVE, TEXT, existing_path, one_of

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
  c.grid_dir = ""  # a GRID corpus root (multimodal_jax.datasets.grid): train and test on GRID instead
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
