"""AVDCNN inference: whole-utterance enhancement, and enhancing a user's recordings (files or folders).

`Enhancer` runs the frame-wise model over an utterance: STFT -> per-utterance normalized log power
(the training features of `data/frames.py`) -> the model on every frame with its ±2 context and the
population batch-norm statistics -> de-normalized with the noisy statistics -> resynthesis with the
noisy phase by overlap-add. Signals are zero-padded to whole seconds (`audio.bucket_length`) so that
one jitted function serves every utterance of the same padded length; the padding is masked out.

`plan` reads and checks a user's recordings and mouth frames (one file, or every audio file of a
folder with the `.npy` of the same stem in the lips folder) before any model is restored, so that a
bad input ends in one line without the wait; `run` enhances them and writes the outputs.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import audio
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint

RADIUS = avdcnn.CONTEXT // 2  # ±2 context frames
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au", ".caf", ".w64", ".rf64", ".mp3")


def context_batch(normalized: jnp.ndarray, lips: jnp.ndarray | None, frames) -> dict:
  """The model's inputs for every frame of an utterance: `audio` `[T, 257, 5]` (each normalized frame
  with its ±2 neighbours) and, with `lips` `[T, 16, 24, 3]`, `lips` `[T, 5, 16, 24, 3]`; context is
  clamped to the first `frames` frames (the rest are padding)."""
  index = audio.context_index(normalized.shape[0], RADIUS, frames)
  batch = {"audio": jnp.swapaxes(normalized[index], 1, 2)}
  return batch | ({"lips": lips[index]} if lips is not None else {})


class Enhancer:
  """Enhances whole 16 kHz utterances with an AVDCNN's params and population batch-norm statistics
  (see the module docstring). One jitted function per padded length (whole seconds)."""

  def __init__(self, model: avdcnn.AVDCNN, params, batch_stats):
    self.model = model
    self.params = params
    self.batch_stats = batch_stats
    self._fn = jax.jit(self._enhance_padded)

  def _enhance_padded(self, params, batch_stats, noisy, lips, frames):
    spectrum = audio.stft(noisy)
    log_power = audio.log_power(spectrum)
    normalized, mean, std = audio.normalize_utterance(log_power, frames=frames)
    batch = context_batch(normalized, lips, frames)
    out = avdcnn.apply_inference(self.model, params, batch_stats, batch)["audio"]
    valid = (jnp.arange(log_power.shape[0]) < frames)[:, None]
    enhanced = jnp.where(valid, out * std + mean, log_power)
    return audio.resynthesize(enhanced, spectrum, noisy.shape[0])

  def __call__(self, noisy: np.ndarray, lips: np.ndarray | None) -> np.ndarray:
    """Enhanced float32 `[N]` of a 16 kHz float signal `[N]` and its uint8 mouth frames `[T, 16, 24, 3]`
    (ignored by the audio-only model; None is fine there)."""
    n = len(noisy)
    frames = audio.num_frames(n)
    padded = audio.bucket_length(n)
    if not self.model.config.visual:
      lips = None  # the audio-only model takes no lips
    elif lips is None:
      raise ValueError("this model sees the lips: pass the mouth frames, uint8 [T, 16, 24, 3]")
    else:
      lips = audio.pad_to(np.asarray(lips), audio.num_frames(padded))
    noisy = audio.pad_to(np.asarray(noisy, np.float32), padded)
    out = self._fn(self.params, self.batch_stats, noisy, lips, np.int32(frames))
    return np.asarray(out[:n])


def from_workdir(workdir: str, model: avdcnn.AVDCNN, mesh: jax.sharding.Mesh) -> tuple[Enhancer, int]:
  """`(enhancer, step)` of the newest checkpoint of the run in `workdir`: its params and the
  batch-norm statistics saved with them (the train state's model state); no optimizer is built."""
  init, shapes = avdcnn.make_init_params(model), avdcnn.batch_stats_shapes(model)
  step, params, stats = from_checkpoint.restore_params(workdir, init, mesh, model_state=shapes)
  return Enhancer(model, jax.device_get(params), jax.device_get(stats)), step


def plot_example(enhancer: Enhancer, example: dict, note: str, path: str) -> None:
  """Writes the noisy / enhanced / clean log spectrograms of a test example (`clean`, `noisy`,
  `lips`, `speaker`, `noise`, `snr`) to an image at `path`, each with its PESQ and STOI."""
  from multimodal_jax.avdcnn import evaluate as speech_quality

  clean, noisy = np.asarray(example["clean"], np.float32), np.asarray(example["noisy"], np.float32)
  signals = {"noisy": noisy, "enhanced": enhancer(noisy, example["lips"]), "clean": clean}
  log_power = {k: np.asarray(audio.log_power(audio.stft(v))) for k, v in signals.items()}
  title = f"{example['speaker']}, {example['noise']} noise at {float(example['snr']):g} dB ({note})"
  speech_quality.plot_spectrograms(signals, log_power, audio.SAMPLE_RATE, title, path)


# --- A user's recordings ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
  """One recording to enhance: the signal at 16 kHz, its original rate and length, its mouth frames
  (None for the audio-only model) and where the result goes."""

  source: str
  signal: np.ndarray
  rate: int
  length: int
  lips: np.ndarray | None
  output: str


def _job(path: str, lips_path: str, output: str, visual: bool, resample: bool) -> Job:
  signal, rate = audio.read_audio(path, what="input")
  if len(signal) < audio.N_FFT:
    raise UserError(
      f"input {path!r} holds {len(signal)} samples: too short to enhance (at least {audio.N_FFT} needed); "
      "give a longer recording"
    )
  if rate != audio.SAMPLE_RATE and not resample:
    raise UserError(
      f"input {path!r} is sampled at {rate} Hz but the model needs {audio.SAMPLE_RATE} Hz; "
      "resample it or drop --config.resample=false"
    )
  length = len(signal)
  signal = audio.resample(signal, rate, audio.SAMPLE_RATE)
  lips = audio.read_lips(lips_path, audio.num_frames(len(signal)), avdcnn.LIPS_SHAPE) if visual else None
  return Job(path, signal, rate, length, lips, output)


def _audio_files(directory: str) -> list[str]:
  names = sorted(f for f in os.listdir(directory) if f.lower().endswith(AUDIO_SUFFIXES))
  paths = [os.path.join(directory, f) for f in names if os.path.isfile(os.path.join(directory, f))]
  if not paths:
    raise UserError(
      f"input directory {directory!r} holds no audio file ({', '.join(AUDIO_SUFFIXES[:3])}, ...); "
      "put the recordings there or pass one file"
    )
  return paths


def plan(input_path: str, lips_path: str, output: str, visual: bool, resample: bool = True) -> list[Job]:
  """Reads and checks the recordings to enhance (UserError, one line, for the first bad one).

  `input_path` a file: `lips_path` its `.npy` mouth frames, `output` the file to write (its folder
  must exist). `input_path` a folder: every audio file in it, `lips_path` a folder holding
  `STEM.npy` for each `STEM.wav` (or .flac, ...), `output` a folder (created) that receives
  `STEM.wav` for each. The lips are only read for a `visual` model.
  """
  if not input_path or not output:
    raise UserError("enhance needs --config.input=NOISY.wav (or a folder) and --config.output=OUT.wav (or a folder)")
  if not os.path.isdir(input_path):
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
      raise UserError(f"the output directory {out_dir!r} does not exist; create it or choose another --config.output")
    if os.path.isdir(output) or not output.lower().endswith((".wav", ".flac")):
      raise UserError(f"--config.output={output!r}: name the .wav or .flac file to write (16-bit PCM)")
    if visual and lips_path and os.path.isdir(lips_path):
      raise UserError(f"--config.lips={lips_path!r} is a directory: for one input, pass its .npy mouth frames")
    return [_job(input_path, lips_path, output, visual, resample)]
  if os.path.isfile(output):
    raise UserError(f"--config.output={output!r} is a file: for an input folder, name a folder to write into")
  if visual and not os.path.isdir(lips_path or ""):
    raise UserError(
      f"--config.lips={lips_path!r} is not a directory: for an input folder, pass a folder of STEM.npy mouth frames"
    )
  jobs, outputs = [], set()
  for path in _audio_files(input_path):
    stem = os.path.splitext(os.path.basename(path))[0]
    lips = os.path.join(lips_path, stem + ".npy") if visual else ""
    if visual and not os.path.isfile(lips):
      raise UserError(f"no mouth frames for input {path!r}: expected {lips!r} (uint8 [T, 16, 24, 3], numpy.save)")
    target = os.path.join(output, stem + ".wav")
    if target in outputs:
      raise UserError(f"two inputs in {input_path!r} share the name {stem!r}: rename one (each writes {stem}.wav)")
    outputs.add(target)
    jobs.append(_job(path, lips, target, visual, resample))
  return jobs


def run(enhancer: Enhancer, jobs: list[Job]) -> list[dict]:
  """Enhances each job and writes it as 16-bit PCM at the input's rate and length; one summary per job."""
  done = []
  for job in jobs:
    if job.rate != audio.SAMPLE_RATE:
      print(
        f"note: resampled the input from {job.rate} Hz to {audio.SAMPLE_RATE} Hz (and the output back): {job.source}"
      )
    enhanced = audio.resample(enhancer(job.signal, job.lips), audio.SAMPLE_RATE, job.rate)
    enhanced = np.pad(enhanced, (0, max(0, job.length - len(enhanced))))[: job.length]
    os.makedirs(os.path.dirname(os.path.abspath(job.output)), exist_ok=True)
    audio.write_audio(job.output, enhanced, job.rate)
    done.append({"output": job.output, "samples": job.length, "rate": job.rate})
  return done
