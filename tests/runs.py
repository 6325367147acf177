"""What the session makes once and several test files read. The tiny trained run of each experiment
(`trained_runs` in conftest.py): its arguments, and the data fixture it trains on; a file that needs a
trained run to read, evaluate, sample from or feed bad input to takes a copy of this one instead of
training its own. And the in-memory splits of the session's AV-digits build, which
tests/datasets/test_av_digits.py compares the written records with."""

import os

TRAIN_ARGS = {
  "fusion": ["--config.steps=4", "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=0"],
  "clip": ["--config.steps=2", "--config.batch_size=16", "--config.checkpoint_every=2", "--config.log_every=1"],
  # 4 steps, statistics of 2 batches, one checkpoint at the end (tests/avdcnn/test_run.py reads them)
  "avdcnn": [
    "--config.data_config=tiny", "--config.model=tiny", "--config.steps=4", "--config.batch_size=64",
    "--config.checkpoint_every=4", "--config.log_every=1", "--config.bn_batches=2",
  ],
  # both stages, 4 steps each on 256 training images (tests/latent_diffusion/test_run.py reads them)
  "latent_diffusion": [
    "--config.autoencoder.steps=4", "--config.autoencoder.batch_size=16", "--config.autoencoder.checkpoint_every=2",
    "--config.denoiser.steps=4", "--config.denoiser.batch_size=16", "--config.denoiser.checkpoint_every=2",
    "--config.autoencoder.log_every=1", "--config.denoiser.log_every=1", "--config.text_layers=1",
    "--config.final_eval=false", "--config.train_images=256",
  ],
}  # fmt: skip
AV_DIGITS_SPLITS = "av_digits_splits.npz"  # beside the data: the splits its AV-digits build wrote
DATA_FIXTURE = {
  "fusion": "av_digits_dir",
  "clip": "captioned_dir",
  "avdcnn": "av_speech_dir",
  "latent_diffusion": "captioned_dir",
}


def experiment(name):
  """The experiment's `run` module (its `main(argv)`)."""
  import importlib

  return importlib.import_module(f"multimodal_jax.{name}.run")


def load_av_digits_keeping_splits(data_dir: str) -> None:
  """`av_digits.load(data_dir)`; when it builds the data, the splits it writes are kept in AV_DIGITS_SPLITS."""
  import numpy as np
  import pytest

  from multimodal_jax.datasets import av_digits

  make_splits = av_digits.make_splits

  def keep(*args, **kwargs):
    splits = make_splits(*args, **kwargs)
    flat = {f"{split}/{key}": value for split, arrays in splits.items() for key, value in arrays.items()}
    np.savez(os.path.join(data_dir, AV_DIGITS_SPLITS), **flat)
    return splits

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(av_digits, "make_splits", keep)
    av_digits.load(data_dir)


def kept_av_digits_splits(data_dir: str) -> dict | None:
  """`{split: {key: array}}` as the AV-digits build in `data_dir` wrote them, or None where it kept none (data
  built before, e.g. in an earlier MMJ_TEST_DATA_DIR)."""
  import numpy as np

  path = os.path.join(data_dir, AV_DIGITS_SPLITS)
  if not os.path.exists(path):
    return None
  splits = {}
  with np.load(path) as arrays:
    for key in arrays.files:
      split, name = key.split("/")
      splits.setdefault(split, {})[name] = arrays[key]
  return splits
