"""The shared small helpers: batched_apply, l2_normalize, random_shift, the text featurisers' cached
core, and the sources that give text as str."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax.arrays import batched_apply, l2_normalize, pad_rows, random_shift
from multimodal_jax.data.pipeline import ArraySource, TextDecoded
from multimodal_jax.text.featurisers import CachedTextFeatures


def test_pad_rows_repeats_the_last_row():
  a = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(pad_rows(a, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  assert pad_rows(a, 3) is a


@pytest.mark.parametrize("n, shrink", [(1, True), (7, True), (8, True), (17, True), (5, False), (17, False)])
def test_batched_apply_equals_one_call_and_compiles_one_shape(n, shrink):
  x = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
  tree = {"x": x, "y": np.arange(n)}
  shapes = []

  def fn(chunk):
    shapes.append(chunk["x"].shape)
    return chunk["x"] * 2.0, {"id": chunk["y"] + 1}

  doubled, ids = batched_apply(fn, tree, 8, shrink=shrink)
  np.testing.assert_array_equal(doubled, x * 2.0)
  np.testing.assert_array_equal(ids["id"], np.arange(n) + 1)
  assert set(shapes) == {(min(8, n) if shrink else 8, 3)}
  assert len(shapes) == -(-n // 8)


def test_batched_apply_refuses_ragged_or_empty_input():
  with pytest.raises(ValueError, match="equal length"):
    batched_apply(lambda c: c, {"a": np.zeros(3), "b": np.zeros(4)}, 2)
  with pytest.raises(ValueError, match="at least one row"):
    batched_apply(lambda c: c, np.zeros((0, 2)), 2)


def test_l2_normalize_numpy_and_jax_agree():
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  x[2] = 0.0
  host = l2_normalize(x)
  assert isinstance(host, np.ndarray) and host.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(host, axis=-1), [1, 1, 0, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(l2_normalize)(jnp.asarray(x))), host, rtol=1e-6, atol=1e-7)
  assert l2_normalize(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.bfloat16


def test_random_shift_moves_pixels_and_fills_the_border():
  images = jnp.zeros((16, 6, 6, 1)).at[:, 2:4, 2:4, :].set(1.0)
  out = random_shift(images, jax.random.key(0), 2, fill=-1.0)
  assert out.shape == images.shape
  assert set(np.unique(np.asarray(out)).tolist()) == {-1.0, 0.0, 1.0}  # moved pixels and the filled border
  assert np.asarray(out == 1.0).sum(axis=(1, 2, 3)).tolist() == [4] * 16  # the square is never cut off
  assert len({np.asarray(o).tobytes() for o in out}) > 1  # images move by different offsets
  assert random_shift(images, jax.random.key(0), 0, fill=-1.0) is images


def test_cached_text_features_compute_each_text_once_in_fixed_batches():
  calls = []

  def tokenize(texts):
    calls.append(list(texts))
    return {"ids": np.asarray([[len(t), ord(t[0]) if t else 0] for t in texts], np.int32)}

  def compute(params, inputs):
    return inputs["ids"] * params, inputs["ids"][:, 0] > 3

  traces = []
  features = CachedTextFeatures(tokenize, lambda p, x: (traces.append(1), compute(p, x))[1], 10, (np.float32, bool), 4)
  texts = ["seven", "two", "a", "seven", "nine", "one", "eight"]
  values, long = features(texts)
  assert values.dtype == np.float32 and long.dtype == bool and values.shape == (7, 2)
  np.testing.assert_array_equal(values[:, 0], [10 * len(t) for t in texts])
  np.testing.assert_array_equal(long, [len(t) > 3 for t in texts])
  assert calls == [sorted(set(texts))]  # each distinct text tokenized once, in one call
  again, _ = features(["two", "zero"])  # only "zero" is new
  assert calls[-1] == ["zero"] and again[0, 0] == 30 and again[1, 0] == 40
  assert len(traces) == 1  # every batch padded to 4 rows: one compiled shape
  with pytest.raises(ValueError, match="at least one"):
    features([])


def test_sources_give_text_as_str():
  base = ArraySource(caption=np.asarray([b"a seven.", b"a two."], object), label=np.arange(2))
  assert len(base) == 2 and base[1]["label"] == 1
  decoded = TextDecoded(base, ("caption",))
  assert len(decoded) == 2 and decoded[0]["caption"] == "a seven." and isinstance(decoded[1]["caption"], str)
  assert TextDecoded(ArraySource(caption=np.asarray([b"x"])), ("caption",))[0]["caption"] == "x"
  with pytest.raises(ValueError, match="one length"):
    ArraySource(a=np.zeros(2), b=np.zeros(3))
