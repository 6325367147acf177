"""Fusion modules over any number of modalities, and the gradient paths of joint fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from multimodal_jax.fusion.encoders import encoder_for_shape
from multimodal_jax.fusion.losses import fusion_loss
from multimodal_jax.fusion.model import EarlyFusion, JointFusion, LateFusion
from multimodal_jax.layers import MLP, ConvEncoder

B, C = 4, 5


def _inputs(n):
  shapes = {"audio": (B, 12, 8), "image": (B, 16, 16, 1), "depth": (B, 7), "text": (B, 3, 5)}
  rng = np.random.default_rng(0)
  return {m: jnp.asarray(rng.normal(size=s), jnp.float32) for m, s in list(shapes.items())[:n]}


class Flat(nn.Module):
  features: int = 6

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.features)(x.reshape(x.shape[0], -1))


def _models(names):
  return {
    "early": EarlyFusion(f=MLP((8,), C), modalities=tuple(names)),
    "late": LateFusion(predictors={m: Flat(C) for m in names}),
    "late_learned": LateFusion(predictors={m: Flat(C) for m in names}, learn_weights=True),
    "joint": JointFusion(encoders={m: Flat() for m in names}, g=MLP((8,), C), num_classes=C),
  }


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["early", "late", "late_learned", "joint"])
def test_shapes_for_any_number_of_modalities(n, kind):
  inputs = _inputs(n)
  model = _models(list(inputs))[kind]
  params = model.init(jax.random.key(0), inputs)
  logits, aux = model.apply(params, inputs)
  assert logits.shape == (B, C)
  if kind != "early":
    assert sorted(aux["per_modality"]) == sorted(inputs)
    assert all(v.shape == (B, C) for v in aux["per_modality"].values())


def test_missing_modality_is_an_error():
  inputs = _inputs(2)
  model = _models(["audio", "image", "depth"])["joint"]
  with pytest.raises(ValueError, match="expects modalities"):
    model.init(jax.random.key(0), inputs)


def test_late_fusion_is_the_weighted_sum_of_the_predictors():
  inputs = _inputs(2)
  model = LateFusion(predictors={m: Flat(C) for m in inputs}, weights={"audio": 0.25, "image": 0.75})
  params = model.init(jax.random.key(0), inputs)
  fused, aux = model.apply(params, inputs)
  expected = 0.25 * aux["per_modality"]["audio"] + 0.75 * aux["per_modality"]["image"]
  np.testing.assert_allclose(fused, expected, rtol=1e-6)


def _np_cross_entropy(logits, labels):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]


def test_fusion_loss_is_the_fused_cross_entropy_plus_the_weighted_mean_of_the_heads():
  rng = np.random.default_rng(3)
  logits, audio, image = rng.normal(size=(3, 6, C)).astype(np.float32) * 2
  labels = rng.integers(0, C, 6)
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  aux = {"per_modality": {"audio": jnp.asarray(audio), "image": jnp.asarray(image)}}

  def by_hand(weights):
    mean = lambda v: (v * weights).sum() / weights.sum()
    heads = (mean(_np_cross_entropy(audio, labels)) + mean(_np_cross_entropy(image, labels))) / 2
    return mean(_np_cross_entropy(logits, labels)), heads, mean((logits.argmax(-1) == labels).astype(np.float64))

  for m, weights in ((None, np.ones(6)), (mask, mask)):
    fused, heads, accuracy = by_hand(weights)
    for w in (0.0, 0.3, 1.0):
      total, metrics = fusion_loss(jnp.asarray(logits), aux, jnp.asarray(labels), mask=m, unimodal_weight=w)
      # catches a head term summed instead of averaged, a weight ignored or applied to the fused term, an
      # unmasked mean, or the heads' loss taken against the fused logits
      np.testing.assert_allclose(float(total), fused + w * heads, rtol=1e-5)
      np.testing.assert_allclose(float(metrics["fused_loss"]), fused, rtol=1e-5)
      np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)
  # the heads' term is not negligible here, so the checks above can tell the variants apart
  assert abs(by_hand(np.ones(6))[1] - by_hand(np.ones(6))[0]) > 1e-2


def _grad_norms(detach):
  inputs = _inputs(2)
  labels = jnp.arange(B) % C
  model = JointFusion(encoders={m: Flat() for m in inputs}, g=MLP((8,), C), num_classes=C, detach_encoders=detach)
  params = model.init(jax.random.key(0), inputs)["params"]

  def loss(params, unimodal_weight):
    logits, aux = model.apply({"params": params}, inputs)
    return fusion_loss(logits, aux, labels, unimodal_weight=unimodal_weight)[0]

  def norms(g):
    return {k: float(sum(jnp.sum(x**2) for x in jax.tree.leaves(v))) for k, v in g.items()}

  return norms(jax.grad(loss)(params, 0.0)), norms(jax.grad(loss)(params, 1.0))


def test_seed_joint_variant_stops_the_joint_gradient_at_the_encoders():
  fused_only, with_heads = _grad_norms(detach=True)
  assert fused_only["encoders_audio"] == 0.0 and fused_only["encoders_image"] == 0.0
  assert fused_only["g"] > 0.0
  assert with_heads["encoders_audio"] > 0.0 and with_heads["encoders_image"] > 0.0


def test_seed_joint_variant_trains_each_encoder_only_from_its_own_modality():
  inputs = _inputs(2)
  labels = jnp.arange(B) % C
  model = JointFusion(encoders={m: Flat() for m in inputs}, g=MLP((8,), C), num_classes=C, detach_encoders=True)
  params = model.init(jax.random.key(0), inputs)["params"]

  def audio_head_loss(params):
    _, aux = model.apply({"params": params}, inputs)
    return fusion_loss(aux["per_modality"]["audio"], {}, labels)[0]

  g = jax.grad(audio_head_loss)(params)
  assert float(sum(jnp.sum(x**2) for x in jax.tree.leaves(g["encoders_image"]))) == 0.0
  assert float(sum(jnp.sum(x**2) for x in jax.tree.leaves(g["encoders_audio"]))) > 0.0


def test_usual_joint_fusion_trains_the_encoders_through_the_joint_loss():
  fused_only, _ = _grad_norms(detach=False)
  assert fused_only["encoders_audio"] > 0.0 and fused_only["encoders_image"] > 0.0


@pytest.mark.slow
def test_conv_encoder_accepts_images_and_spectrograms():
  enc = ConvEncoder(channels=(4, 8), features=16)
  for x in (jnp.ones((2, 28, 28, 1)), jnp.ones((2, 50, 32))):
    params = enc.init(jax.random.key(0), x)
    assert enc.apply(params, x).shape == (2, 16)


@pytest.mark.parametrize(
  "shape, by_rank, kernel",
  [
    ((28, 28, 1), False, (3, 3, 1, 16)),  # AV-digits: images ...
    ((20, 8), False, (3, 3, 1, 16)),  # ... and spectrograms read as images
    ((8, 8, 3), True, (3, 3, 3, 16)),  # [H, W, C]: 2-D convolutions
    ((20, 8), True, (3, 8, 32)),  # [T, F]: 1-D convolutions over T
    ((6,), True, None),  # a vector: an MLP
    ((), True, None),  # a scalar: an MLP over one input
  ],
)
def test_encoder_for_shape_follows_the_rank(shape, by_rank, kernel):
  enc = encoder_for_shape(shape, by_rank=by_rank, features=12, hidden=24)
  x = jnp.ones((2, *shape))
  params = nn.unbox(jax.eval_shape(lambda: enc.init(jax.random.key(0), x))["params"])
  assert jax.eval_shape(lambda p: enc.apply({"params": p}, x), params).shape == (2, 12)
  if kernel is None:
    assert params["hidden"]["kernel"].shape == (max(1, int(np.prod(shape))), 24)
  else:
    assert params["conv_0"]["kernel"].shape == kernel
