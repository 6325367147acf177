"""AVDCNN's config: every key declared once in `KEYS` (default, rule, help, group), from which
`get_config()` and `RULES` derive; the keys an evaluation may change; the model a config asks for."""

from __future__ import annotations

import dataclasses

import ml_collections

from multimodal_jax import config as cfg
from multimodal_jax import loop
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.config import BOOL, FINITE, NON_NEGATIVE, POSITIVE, TEXT, Key, existing_path, one_of

EVAL_KEYS = ("mesh", "data_dir", "eval_utterances", "eval_processes", "input", "lips", "output", "resample", "utterance")  # fmt: skip


KEYS = {
  **loop.base_keys(steps=4000, batch_size=256, log_every=100, checkpoint_every=500, keep_checkpoints=2),
  "data_config": Key("default", one_of("default", "tiny"), "av_speech config: default or tiny", "data"),
  "data_dir": Key("", TEXT, "TFDS data dir where AV-speech (or GRID) is prepared; empty: the TFDS default", "data"),
  "grid_dir": Key(
    "",
    existing_path("dir"),
    "a GRID corpus root (multimodal_jax.datasets.grid): train and test on GRID instead",
    "data",
  ),
  "noise_dir": Key(
    "",
    existing_path("dir"),
    "audio files to mix the training data with (instead of the Debian packages' noises)",
    "data",
  ),
  "modalities": Key(
    "audio,visual",
    one_of("audio,visual", "visual,audio", "audio"),
    "audio,visual, or audio alone (the audio-only baseline)",
    "model",
  ),
  "fusion": Key("joint", one_of(*avdcnn.FUSIONS), "how the audio and visual streams meet", "model"),
  "model": Key("paper", one_of(*avdcnn.PRESETS), "preset of multimodal_jax.avdcnn.model", "model"),
  "head": Key(
    "gain",
    one_of(*avdcnn.HEADS),
    "audio head: gain (noisy centre frame - softplus), residual, or plain (the paper's)",
    "model",
  ),
  "bn_batches": Key(16, POSITIVE, "training batches for the population batch-norm statistics", "model"),
  "loss": Key(
    "compressed",
    one_of("compressed", "log_power"),
    "compressed (|S|^0.3 magnitudes) or log_power (the paper's)",
    "loss",
  ),
  "remat": cfg.remat_key(),
  "mu": Key(1.0, NON_NEGATIVE, "weight of the visual reconstruction loss", "loss"),
  "under_weight": Key(
    1.0, NON_NEGATIVE, "weight of squared audio errors below the target (over-suppression); 1: the paper's loss", "loss"
  ),
  "target_floor": Key(-4.0, FINITE, "floor of the normalized clean target (digital silence would be ~ -10)", "loss"),
  "eval_utterances": Key(0, NON_NEGATIVE, "test utterances evaluated; 0: every one", "eval"),
  "eval_processes": Key(2, POSITIVE, "processes computing PESQ / STOI", "eval"),
  "input": Key(
    "", TEXT, "--mode=enhance: a noisy audio file, or a directory of them", "enhance"
  ),  # checked by enhance.plan
  "lips": Key("", TEXT, "--mode=enhance: its .npy mouth frames, or a directory of STEM.npy", "enhance"),
  "output": Key(
    "",
    TEXT,
    "--mode=enhance: a file, or a directory for a directory of inputs; --mode=spectrogram: the image",
    "enhance",
  ),
  "resample": Key(True, BOOL, "--mode=enhance: resample inputs at another rate (false: refuse them)", "enhance"),
  "utterance": Key(0, NON_NEGATIVE, "--mode=spectrogram: which test utterance", "enhance"),
}

GROUPS = {"enhance": "enhancing your own recordings (--mode=enhance) and drawing spectrograms (--mode=spectrogram)"}

RULES = cfg.rules_of(KEYS)


@cfg.declares(KEYS, GROUPS)
def get_config() -> ml_collections.ConfigDict:
  """AVDCNN audio-visual speech enhancement on the embedded AV-speech data, or on GRID."""
  return cfg.make_config(KEYS)


def model_config(config) -> avdcnn.AVDCNNConfig:
  """The model of `config` (the rules have checked each choice)."""
  modalities = tuple(m for m in avdcnn.MODALITIES if m in config.modalities.split(","))
  return dataclasses.replace(
    avdcnn.PRESETS[config.model], modalities=modalities, fusion=config.fusion, head=config.head
  )
