"""The tiny trained run of each experiment that several test files read (`trained_runs` in conftest.py):
its arguments, and the data fixture it trains on. A file that needs a trained run to read, evaluate,
sample from or feed bad input to takes a copy of this one instead of training its own, so each is
trained once a session."""

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
# In the session's data dir: the in-memory splits its AV-digits build wrote (conftest.av_digits_dir), which
# tests/datasets/test_av_digits.py compares the written records with.
AV_DIGITS_SPLITS = "av_digits_splits.npz"
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
