"""AVDCNN's speech-quality scores (`multimodal_jax.avdcnn.evaluate`): PESQ / STOI wrappers against the
packages, segmental SNR and SDI by hand, bad inputs, empty sets."""

import numpy as np
import pesq as pesq_lib
import pystoi
import pytest

from multimodal_jax.avdcnn import evaluate as sq


def _speech_like(seconds=2.0, rate=16000, seed=0):
  """Voiced syllables: harmonics of a gliding pitch under a 0.5 s syllable envelope, with pauses (PESQ's
  voice activity detector finds no utterance in shorter bursts)."""
  t = np.arange(int(seconds * rate)) / rate
  f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(f0) / rate
  voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
  envelope = np.clip(np.sin(2 * np.pi * t), 0, None) ** 2
  return (0.3 * voiced * envelope).astype(np.float32)


def test_wrappers_agree_with_the_packages_and_rank_clean_above_noisy():
  clean = _speech_like()
  rng = np.random.default_rng(0)
  noisy = clean + 0.003 * rng.normal(size=clean.shape).astype(np.float32)
  very_noisy = clean + 0.1 * rng.normal(size=clean.shape).astype(np.float32)
  assert sq.pesq(clean, noisy, 16000) == pytest.approx(pesq_lib.pesq(16000, clean, noisy, "wb"), abs=1e-6)
  assert sq.stoi(clean, noisy, 16000) == pytest.approx(pystoi.stoi(clean, noisy, 16000), abs=1e-9)
  nb_clean = _speech_like(rate=8000)
  nb_noisy = nb_clean + 0.003 * rng.normal(size=nb_clean.shape).astype(np.float32)
  assert sq.pesq(nb_clean, nb_noisy, 8000) == pytest.approx(pesq_lib.pesq(8000, nb_clean, nb_noisy, "nb"), abs=1e-6)
  scores = [sq.score(clean, x, 16000) for x in (clean, noisy, very_noisy)]
  for key in ("pesq", "pesq_nb", "stoi", "ssnr"):
    assert scores[0][key] > scores[1][key] > scores[2][key]
  assert scores[1]["pesq_nb"] == pytest.approx(pesq_lib.pesq(16000, clean, noisy, "nb"), abs=1e-6)
  assert scores[0]["sdi"] == 0.0 < scores[1]["sdi"] < scores[2]["sdi"]
  # the pool returns the same, in order
  pooled = sq.score_utterances([(clean, noisy), (clean, very_noisy)], 16000, processes=2)
  assert [p["pesq"] for p in pooled] == pytest.approx([scores[1]["pesq"], scores[2]["pesq"]], abs=1e-6)


def test_segmental_snr_and_sdi_by_hand():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=1024)
  deg = ref + 0.1 * rng.normal(size=1024)
  frames = [slice(s, s + 512) for s in range(0, 1024 - 512 + 1, 256)]
  by_hand = np.mean([10 * np.log10(np.sum(ref[f] ** 2) / np.sum((ref[f] - deg[f]) ** 2)) for f in frames])
  assert sq.segmental_snr(ref, deg, 16000) == pytest.approx(by_hand, rel=1e-6)
  assert sq.sdi(ref, deg) == pytest.approx(np.sum((ref - deg) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda s: sq.pesq(s, s, 44100), "not supported"),
    (lambda s: sq.pesq(s, s, 8000, mode="wb"), "wide-band needs 16000"),
    (lambda s: sq.pesq(s, s[:-1], 16000), "differ in length"),
    (lambda s: sq.stoi(s, s, 4000), "too low"),
    (lambda s: sq.stoi(s[None], s[None], 16000), "1-D"),
  ],
)
def test_bad_inputs_raise_clear_errors(call, message):
  with pytest.raises(sq.ScoreInputError, match=message):
    call(_speech_like(1.0))


def test_no_utterance_is_counted_not_raised():
  silent = np.zeros(16000, np.float32)
  rows = [sq.score(silent, silent + 1e-4, 16000), sq.score(_speech_like(), _speech_like(), 16000)]
  assert np.isnan(rows[0]["pesq"]) and "NoUtterances" in rows[0]["pesq_error"]
  summary = sq.mean_scores(rows)
  assert summary["pesq_failures"] == 1 and summary["pesq"] == pytest.approx(rows[1]["pesq"])
