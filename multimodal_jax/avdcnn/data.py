"""AVDCNN's data: the embedded AV-speech corpus (or a GRID root), loaded the same way on every process."""

from __future__ import annotations

from multimodal_jax.data.pipeline import load_on_every_process


def load_data(config):
  from multimodal_jax.datasets import av_speech, grid

  data_dir, noise_dir, sizes = config.data_dir or None, config.noise_dir or None, config.data_config
  if config.grid_dir:
    return load_on_every_process(lambda: grid.load(config.grid_dir, data_dir, noise_config=sizes, noise_dir=noise_dir))
  return load_on_every_process(lambda: av_speech.load(data_dir, config=sizes, noise_dir=noise_dir))
