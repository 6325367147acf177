"""AVDCNN's training frames (`multimodal_jax.avdcnn.frames`): the features of the audio front end, frames
that keep to their utterance, seeded batches of distinct frames."""

import numpy as np

from multimodal_jax import audio
from multimodal_jax.avdcnn import frames as frames_lib
from tests.avdcnn.test_evaluate import _speech_like


def _fake_examples(count=3, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    n = 16000 + 3217 * i
    clean = _speech_like(n / 16000, seed=i)[:n]
    noisy = clean + 0.1 * rng.normal(size=n).astype(np.float32)
    t = audio.num_frames(n, 512, 320)
    lips = rng.integers(0, 256, size=(t, 16, 24, 3), dtype=np.uint8)
    out.append({"clean": clean, "noisy": noisy, "lips": lips, "snr": np.float32(5.0), "noise": "white"})
  return out


def test_features_match_the_audio_front_end_and_frames_keep_to_their_utterance():
  examples = _fake_examples()
  x, y, _, _ = frames_lib.utterance_features(examples[1], floor=-4.0)
  lp = audio.log_power(audio.stft(examples[1]["noisy"]))
  normalized, mean, std = audio.normalize_utterance(lp)
  np.testing.assert_allclose(x, normalized, rtol=1e-4, atol=1e-4)
  clean_lp = audio.log_power(audio.stft(examples[1]["clean"]))
  np.testing.assert_allclose(y, np.maximum((clean_lp - mean) / std, -4.0), rtol=1e-4, atol=1e-4)
  source = frames_lib.FrameSource(examples, floor=-4.0)
  sizes = [len(e["lips"]) for e in examples]
  assert len(source) == sum(sizes)
  first_of_second = sizes[0]
  record = source[first_of_second]  # context must not reach into the first utterance
  np.testing.assert_array_equal(record["audio"][:, 0], x[0])
  np.testing.assert_array_equal(record["audio"][:, 3], x[1])
  np.testing.assert_array_equal(record["lips"][0], examples[1]["lips"][0])
  # the record's statistics de-normalize its frames back to the noisy log power
  np.testing.assert_allclose(record["audio"][:, 2] * record["std"] + record["mean"], lp[0], rtol=1e-4, atol=1e-3)
  rows = np.array([0, first_of_second - 1, first_of_second, len(source) - 1])
  stacked = source.batch(rows)
  for j, r in enumerate(rows):
    for key, value in source[r].items():
      np.testing.assert_array_equal(stacked[key][j], value)


def test_sample_batches_are_distinct_frames_of_a_seeded_permutation():
  source = frames_lib.FrameSource(_fake_examples(2), floor=-4.0)
  batches = source.sample_batches(seed=3, batch_size=16, count=4)
  order = np.random.default_rng(3).permutation(len(source))
  assert len(batches) == 4
  for i, b in enumerate(batches):
    for key, value in source.batch(order[i * 16 : (i + 1) * 16]).items():
      np.testing.assert_array_equal(b[key], value)
  # more batches than the frames hold: as many whole batches as fit; a batch larger than the data: one
  assert len(source.sample_batches(0, 16, 10_000)) == len(source) // 16
  (whole,) = source.sample_batches(0, 10 * len(source), 2)
  assert len(whole["target"]) == len(source)
