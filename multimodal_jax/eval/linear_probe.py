"""Linear probe: multinomial logistic regression on frozen features, trained full-batch in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def linear_probe_accuracy(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  l2: float = 1e-4,
  steps: int = 300,
) -> float:
  """Test accuracy of an L2-regularised softmax classifier fit on standardised train features."""
  mean, std = train_features.mean(0), train_features.std(0) + 1e-6
  x_train = jnp.asarray((train_features - mean) / std)
  x_test = jnp.asarray((test_features - mean) / std)
  y_train = jnp.asarray(train_labels)

  def loss(params):
    logits = x_train @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
    return ce + l2 * jnp.sum(params["w"] ** 2)

  params = {"w": jnp.zeros((x_train.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  opt = optax.lbfgs()
  state = opt.init(params)
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(params, state):
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  predictions = (x_test @ params["w"] + params["b"]).argmax(-1)
  return float((np.asarray(predictions) == np.asarray(test_labels)).mean())
