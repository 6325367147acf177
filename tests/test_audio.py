"""The STFT front end against scipy, and perfect reconstruction through STFT -> ISTFT."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal as sps

from multimodal_jax import audio


def _speechlike(n, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / 16000
  return (np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.3 * rng.normal(size=n)).astype(np.float32)


@pytest.mark.parametrize("n_fft, hop, length", [(512, 320, 16000), (512, 256, 12345), (256, 160, 8000)])
def test_stft_matches_scipy(n_fft, hop, length):
  x = _speechlike(length)
  _, _, expected = sps.stft(
    x.astype(np.float64), nperseg=n_fft, noverlap=n_fft - hop, window="hann", boundary="zeros", padded=True
  )
  ours = np.asarray(audio.stft(jnp.asarray(x), n_fft, hop)) / np.asarray(audio.hann_window(n_fft)).sum()
  assert ours.shape == expected.T.shape == (audio.num_frames(length, n_fft, hop), n_fft // 2 + 1)
  np.testing.assert_allclose(ours, expected.T, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("n_fft, hop, length", [(512, 320, 16000), (512, 256, 12345), (256, 160, 8001)])
def test_stft_then_istft_reconstructs_the_signal(n_fft, hop, length):
  x = jnp.asarray(_speechlike(length, seed=1))
  y = audio.istft(audio.stft(x, n_fft, hop), length, n_fft, hop)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_istft_agrees_with_scipy():
  x = _speechlike(16000, seed=2)
  _, _, spec = sps.stft(x.astype(np.float64), nperseg=512, noverlap=192, window="hann")
  _, expected = sps.istft(spec, nperseg=512, noverlap=192, window="hann")
  ours = audio.istft(jnp.asarray(spec.T * np.asarray(audio.hann_window(512)).sum(), jnp.complex64), 16000)
  np.testing.assert_allclose(np.asarray(ours), expected[:16000], atol=1e-5)


def test_batched_stft_equals_per_signal():
  xs = jnp.stack([jnp.asarray(_speechlike(4000, seed=s)) for s in range(3)])
  batched = audio.stft(xs)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(audio.stft(xs[i])), rtol=1e-6, atol=1e-6)


def test_resynthesis_with_the_true_phase_is_exact():
  x = jnp.asarray(_speechlike(16000, seed=3))
  spec = audio.stft(x)
  y = audio.resynthesize(audio.log_power(spec, eps=0.0), spec, 16000)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4)


def test_context_frames_and_normalization():
  feats = jnp.arange(12.0).reshape(4, 3)  # [frames, bins]
  ctx = jnp.moveaxis(feats[audio.context_index(4, 2), :], -2, -1)  # [frames, bins, 5]
  assert ctx.shape == (4, 3, 5)
  np.testing.assert_array_equal(ctx[0, :, 0], feats[0])  # edge repeated
  np.testing.assert_array_equal(ctx[1, :, 3], feats[2])  # +1 neighbour
  np.testing.assert_array_equal(ctx[3, :, 4], feats[3])
  normed, mean, std = audio.normalize_utterance(jnp.asarray(np.random.default_rng(0).normal(3, 2, (50, 257))))
  np.testing.assert_allclose(normed.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(normed.std(0), 1, atol=1e-3)
  assert mean.shape == std.shape == (1, 257)


def test_padding_is_masked_out_of_the_statistics_and_the_context():
  rng = np.random.default_rng(1)
  feats = jnp.asarray(rng.normal(3, 2, (30, 257)), jnp.float32)
  padded = jnp.concatenate([feats, jnp.full((20, 257), -50.0)])  # 20 padding frames
  want, want_mean, want_std = audio.normalize_utterance(feats)
  got, mean, std = audio.normalize_utterance(padded, frames=jnp.int32(30))
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
  np.testing.assert_allclose(std, want_std, rtol=1e-4)
  np.testing.assert_allclose(got[:30], want, atol=1e-4)
  index = audio.context_index(50, radius=2, frames=jnp.int32(30))
  assert index.shape == (50, 5)
  np.testing.assert_array_equal(index[29], [27, 28, 29, 29, 29])  # the last real frame repeats
  np.testing.assert_array_equal(index[0], [0, 0, 0, 1, 2])
  np.testing.assert_array_equal(audio.context_index(4, radius=2)[3], [1, 2, 3, 3, 3])


def test_istft_refuses_a_length_that_does_not_match():
  with pytest.raises(ValueError, match="frames do not match"):
    audio.istft(audio.stft(jnp.zeros(16000)), 8000)


# --- files (soundfile) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, subtype", [("a.wav", "PCM_16"), ("b.wav", "PCM_24"), ("c.wav", "FLOAT"), ("d.flac", "PCM_16")]
)
def test_read_audio_reads_any_subformat_and_mixes_stereo_down(tmp_path, name, subtype):
  import soundfile

  rng = np.random.default_rng(0)
  stereo = np.clip(0.3 * rng.normal(size=(4410, 2)), -1, 1)
  soundfile.write(tmp_path / name, stereo, 44100, subtype=subtype)
  signal, rate = audio.read_audio(str(tmp_path / name))
  assert rate == 44100 and signal.dtype == np.float32 and signal.shape == (4410,)
  tolerance = {"PCM_16": 1 / 32768, "PCM_24": 1 / 2**23, "FLOAT": 1e-7}[subtype]
  np.testing.assert_allclose(signal, stereo.mean(axis=1), atol=tolerance)
  start, _ = audio.read_audio(str(tmp_path / name), max_seconds=0.05)
  np.testing.assert_array_equal(start, signal[:2205])


def test_write_audio_writes_16_bit_pcm_that_reads_back(tmp_path):
  import soundfile

  x = np.linspace(-1.5, 1.5, 1000).astype(np.float32)  # clipped to [-1, 1]
  audio.write_audio(str(tmp_path / "o.wav"), x, 8000)
  info = soundfile.info(str(tmp_path / "o.wav"))
  assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
  back, _ = audio.read_audio(str(tmp_path / "o.wav"))
  np.testing.assert_allclose(back, np.round(np.clip(x, -1, 1) * 32767) / 32768, atol=1e-7)


def test_missing_or_unreadable_audio_is_one_line(tmp_path):
  from multimodal_jax.errors import UserError

  with pytest.raises(UserError, match="does not exist"):
    audio.read_audio(str(tmp_path / "none.wav"))
  (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x01not really a wave file")
  with pytest.raises(UserError, match="is not a readable audio file") as e:
    audio.read_audio(str(tmp_path / "junk.wav"), what="input")
  assert "\n" not in str(e.value) and str(e.value).startswith("input ")


def test_read_lips_scales_floats_and_checks_the_shape(tmp_path):
  from multimodal_jax.errors import UserError

  np.save(tmp_path / "unit.npy", np.full((7, 16, 24, 3), 0.5, np.float32))
  lips = audio.read_lips(str(tmp_path / "unit.npy"), 7)
  assert lips.dtype == np.uint8 and (lips == 128).all()
  with pytest.raises(UserError, match=r"have shape \(7, 16, 24, 3\), expected \(6, 16, 24, 3\)"):
    audio.read_lips(str(tmp_path / "unit.npy"), 6)


def test_bucket_length_and_pad_to():
  assert [audio.bucket_length(n) for n in (0, 1, 16000, 16001)] == [16000, 16000, 16000, 32000]
  np.testing.assert_array_equal(audio.pad_to(np.ones(3), 5), [1, 1, 1, 0, 0])
  frames = audio.pad_to(np.arange(6).reshape(3, 2), 4)  # frames repeat the last one
  np.testing.assert_array_equal(frames[-1], [4, 5])
