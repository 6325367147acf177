"""--config.remat: every policy gives the gradients of no remat, and the compiled step really keeps fewer
activations (temporaries fall) for the layered models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax import layers


def _transformer_loss(policy):
  opts = layers.TransformerOptions("gelu", attention="einsum", remat=policy, unroll=1)
  model = layers.Transformer(4, 4, options=opts)
  x = jax.random.normal(jax.random.key(1), (8, 32, 64))
  params = model.init(jax.random.key(0), x)

  def loss(p):
    return jnp.mean(model.apply(p, x) ** 2)

  return loss, params


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", True])
def test_remat_policies_keep_the_gradients(policy):
  # Catches a policy that changes the math (a dropped residual, a wrong checkpoint boundary), not just the memory.
  ref_loss, params = _transformer_loss("none")
  loss, _ = _transformer_loss(policy)
  np.testing.assert_allclose(loss(params), ref_loss(params), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), jax.grad(loss)(params),
               jax.grad(ref_loss)(params))  # fmt: skip


@pytest.mark.slow
def test_full_remat_lowers_the_step_temporaries():
  # Catches a remat setting that is accepted but not applied (the same program compiled either way).
  def temps(policy):
    loss, params = _transformer_loss(policy)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  assert temps("full") < 0.8 * temps("none")


def test_checkpointed_function_keeps_values_and_refuses_unknown_policies():
  # Catches the whole-forward remat of the shallow models (fusion, AVDCNN) changing values, or a typo'd policy
  # silently meaning "none".
  w = jax.random.normal(jax.random.key(0), (16, 16))
  f = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
  x = jax.random.normal(jax.random.key(1), (4, 16))
  for policy in ("full", "dots", "dots_no_batch"):
    np.testing.assert_allclose(jax.grad(layers.checkpointed(f, policy))(w, x), jax.grad(f)(w, x), rtol=1e-6)
  with pytest.raises(ValueError, match="remat='everything'"):
    layers.checkpointed(f, "everything")
