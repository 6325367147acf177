"""Contrastive losses: the plain ones against numpy, the sharded ones (and their gradients) against the plain ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax import sharding as shd
from multimodal_jax.clip import losses

SCALE, BIAS = 10.0, -5.0


def unit_rows(rng, batch, dim):
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def correlated_pair(seed, batch, dim):
  """Normalized image and text features whose matching rows are close, so positives are not negligible."""
  rng = np.random.default_rng(seed)
  image = unit_rows(rng, batch, dim)
  text = image + 0.5 * rng.normal(size=image.shape).astype(np.float32)
  return image, text / np.linalg.norm(text, axis=1, keepdims=True)


def np_logsumexp(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_clip_softmax(image, text, scale):
  logits = scale * image.astype(np.float64) @ text.astype(np.float64).T
  diag = np.diagonal(logits)
  return 0.5 * ((np_logsumexp(logits, 1) - diag).mean() + (np_logsumexp(logits, 0) - diag).mean())


def np_sigmoid(image, text, scale, bias):
  logits = scale * image.astype(np.float64) @ text.astype(np.float64).T + bias
  signs = 2 * np.eye(len(image)) - 1
  return np.logaddexp(0.0, -signs * logits).sum() / len(image)  # −log σ(x) = log(1 + e^{−x})


def np_pairwise(x_p, x_q, y, margin):
  total = 0.0
  for p, q, similar in zip(x_p.astype(np.float64), x_q.astype(np.float64), y, strict=True):
    d = np.sqrt(((p - q) ** 2).sum())
    total += 0.5 * d**2 if similar else 0.5 * max(0.0, margin - d) ** 2
  return total / len(y)


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, dim", [(8, 4), (32, 16)])
def test_plain_losses_match_numpy(batch, dim):
  image, text = correlated_pair(0, batch, dim)
  assert_close(losses.clip_softmax_loss(image, text, SCALE), np_clip_softmax(image, text, SCALE))
  assert_close(losses.sigmoid_loss(image, text, SCALE, BIAS), np_sigmoid(image, text, SCALE, BIAS))


def test_plain_losses_prefer_matching_pairs():
  image, text = correlated_pair(1, 16, 8)
  assert_close(losses.clip_softmax_loss(image, text, SCALE), losses.clip_softmax_loss(text, image, SCALE))
  # Matching pairs give a lower loss than shuffled ones.
  shuffled = np.roll(text, 1, axis=0)
  assert losses.clip_softmax_loss(image, text, SCALE) < losses.clip_softmax_loss(image, shuffled, SCALE)
  assert losses.sigmoid_loss(image, text, SCALE, BIAS) < losses.sigmoid_loss(image, shuffled, SCALE, BIAS)


def test_pairwise_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(2)
  x_p, x_q = rng.normal(size=(2, 64, 5)).astype(np.float32) * 0.5
  y = rng.integers(0, 2, 64)
  for margin in (1.0, 3.0):
    assert_close(losses.pairwise_contrastive_loss(x_p, x_q, y, margin), np_pairwise(x_p, x_q, y, margin))


def test_pairwise_contrastive_loss_behaviour():
  x = np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)
  ones, zeros = np.ones(2), np.zeros(2)
  # Identical similar pairs cost nothing; identical dissimilar pairs cost ½ margin².
  assert float(losses.pairwise_contrastive_loss(x, x, ones)) == 0.0
  assert_close(losses.pairwise_contrastive_loss(x, x, zeros, margin=2.0), 0.5 * 2.0**2)
  # A dissimilar pair at distance 0.5 < margin 2 costs ½ 1.5²; at distance 3 ≥ margin, nothing.
  near, far = x + np.array([0.3, 0.4], np.float32), x + np.array([1.8, 2.4], np.float32)
  assert_close(losses.pairwise_contrastive_loss(x, near, zeros, margin=2.0), 0.5 * 1.5**2)
  assert float(losses.pairwise_contrastive_loss(x, far, zeros, margin=2.0)) == 0.0
  # A similar pair at distance 0.5 costs ½ 0.5², whatever the margin.
  assert_close(losses.pairwise_contrastive_loss(x, near, ones, margin=0.1), 0.5 * 0.5**2)
  # Gradients are finite at distance 0 and push dissimilar pairs apart, pull similar ones together.
  grad = jax.grad(losses.pairwise_contrastive_loss, argnums=1)
  assert np.all(np.isfinite(grad(x, x, zeros, 2.0))) and np.all(np.isfinite(grad(x, x, ones, 2.0)))
  direction = near - x
  assert np.all((np.asarray(grad(x, near, zeros, 2.0)) * direction).sum(1) < 0)  # descent moves q away from p
  assert np.all((np.asarray(grad(x, near, ones, 2.0)) * direction).sum(1) > 0)  # descent moves q towards p


SHARDED = {
  "clip_softmax_loss_gathered": (losses.clip_softmax_loss_gathered, losses.clip_softmax_loss, False),
  "clip_softmax_loss_chunked": (losses.clip_softmax_loss_chunked, losses.clip_softmax_loss, False),
  "sigmoid_loss_gathered": (losses.sigmoid_loss_gathered, losses.sigmoid_loss, True),
  "sigmoid_loss_chunked": (losses.sigmoid_loss_chunked, losses.sigmoid_loss, True),
}


def loss_and_grads(fn, with_bias, mesh=None):
  """jit(value_and_grad) of fn w.r.t. image, text, scale (and bias), as a function of (image, text, scale, bias)."""
  extra = () if mesh is None else (mesh,)
  if with_bias:
    return jax.jit(jax.value_and_grad(lambda i, t, s, b: fn(i, t, s, b, *extra), argnums=(0, 1, 2, 3)))
  return jax.jit(lambda i, t, s, b: jax.value_and_grad(lambda i, t, s: fn(i, t, s, *extra), argnums=(0, 1, 2))(i, t, s))


@pytest.mark.parametrize("spec, batch, dim", [("data:8", 16, 8), ("data:4,fsdp:2", 32, 16)])
@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_loss_and_grads_match_single_device(name, spec, batch, dim):
  sharded_fn, plain_fn, with_bias = SHARDED[name]
  mesh = shd.make_mesh(spec)
  image, text = correlated_pair(3, batch, dim)
  scale, bias = jnp.float32(SCALE), jnp.float32(BIAS)
  expected_loss, expected_grads = loss_and_grads(plain_fn, with_bias)(image, text, scale, bias)
  rows = shd.batch_sharding(mesh, 2)
  loss, grads = loss_and_grads(sharded_fn, with_bias, mesh)(
    jax.device_put(image, rows), jax.device_put(text, rows), scale, bias
  )
  assert_close(loss, expected_loss)
  assert len(grads) == len(expected_grads) == (4 if with_bias else 3)
  for grad, expected in zip(grads, expected_grads, strict=True):
    assert np.abs(np.asarray(expected)).max() > 1e-3  # a gradient that is really there
    assert_close(grad, expected)


@pytest.mark.parametrize("name", list(SHARDED))
def test_size_one_batch_axes_fall_back_to_the_plain_loss(name):
  sharded_fn, plain_fn, with_bias = SHARDED[name]
  mesh = shd.make_mesh("tensor:8")
  image, text = correlated_pair(4, 8, 4)
  args = (image, text, SCALE, BIAS) if with_bias else (image, text, SCALE)
  assert_close(jax.jit(lambda *a: sharded_fn(*a, mesh))(*args), plain_fn(*args))


@pytest.mark.parametrize("name", list(SHARDED))
def test_indivisible_batch_is_refused(name):
  sharded_fn, _, with_bias = SHARDED[name]
  image, text = correlated_pair(5, 12, 4)
  args = (image, text, SCALE, BIAS) if with_bias else (image, text, SCALE)
  with pytest.raises(ValueError, match="not divisible"):
    sharded_fn(*args, shd.make_mesh("data:8"))


@pytest.mark.parametrize("name", ["clip_softmax_loss_chunked", "sigmoid_loss_chunked"])
def test_chunked_losses_pass_blocks_and_never_gather(name):
  sharded_fn, _, with_bias = SHARDED[name]
  mesh = shd.make_mesh("data:4,fsdp:2")
  image, text = (jax.device_put(x, shd.batch_sharding(mesh, 2)) for x in correlated_pair(6, 32, 8))
  hlo = loss_and_grads(sharded_fn, with_bias, mesh).lower(image, text, SCALE, BIAS).compile().as_text()
  assert "collective-permute" in hlo
  assert "all-gather" not in hlo
