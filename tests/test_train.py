"""The train step: sharded init, equality across meshes, accumulation, dtype, EMA, NaN guard."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax import sharding as shd
from multimodal_jax import train
from tests import toy


def _batch(n=32, offset=0):
  src = toy.ToySource()
  return {"x": src.x[offset : offset + n], "label": src.label[offset : offset + n]}


def _run(mesh_spec, steps=3, devices=None, **step_kw):
  mesh = shd.make_mesh(mesh_spec, devices)
  tx, schedule = toy.optimizer()
  ema = step_kw.get("ema_decay") is not None
  abstract, shardings = train.abstract_train_state(toy.init_params, tx, mesh, ema=ema)
  state = train.init_train_state(toy.init_params, tx, shardings, jax.random.key(0), ema=ema)
  step = train.make_train_step(toy.loss_fn, tx, mesh, shardings, learning_rate_fn=schedule, **step_kw)
  losses = []
  for i in range(steps):
    state, metrics = step(state, shd.host_to_global_batch(_batch(offset=(32 * i) % 512), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses, step, abstract


def test_params_are_created_sharded_with_the_logical_rules():
  state, _, _, abstract = _run("data:2,fsdp:2,tensor:2", steps=0)
  kernel = state.params["hidden_0"]["kernel"]  # [embed=16, mlp=32]
  assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")
  mu = state.opt_state[0].mu["hidden_0"]["kernel"]
  assert mu.sharding == kernel.sharding  # optimizer moments sharded like their params
  assert abstract.params["hidden_0"]["kernel"].sharding == kernel.sharding


@pytest.mark.parametrize("mesh_spec", ["data:8", "data:4,fsdp:2", "data:2,fsdp:2,tensor:2"])
@pytest.mark.slow
def test_sharded_step_equals_single_device_step(mesh_spec):
  single, single_losses, _, _ = _run("data:1", devices=jax.devices()[:1])
  sharded, sharded_losses, _, _ = _run(mesh_spec)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  chex.assert_trees_all_close(toy.params_of(sharded), toy.params_of(single), rtol=1e-5, atol=1e-6)


def test_step_compiles_once_and_loss_falls():
  _, losses, step, _ = _run("data:8", steps=30)
  assert step._cache_size() == 1
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_gradient_accumulation_matches_the_full_batch():
  # Without dropout the accumulated mean gradient equals the full-batch gradient.
  tx, _ = toy.optimizer()
  mesh = shd.make_mesh("data:4,fsdp:2")
  _, shardings = train.abstract_train_state(toy.init_params, tx, mesh)

  def no_dropout_loss(params, batch, rng):
    logits = toy.MODEL.apply({"params": params}, batch["x"], train=False)
    return toy.fusion_loss(logits, {}, batch["label"])

  results = []
  for accum in (1, 4):
    state = train.init_train_state(toy.init_params, tx, shardings, jax.random.key(0))
    step = train.make_train_step(no_dropout_loss, tx, mesh, shardings, grad_accum_steps=accum)
    state, metrics = step(state, shd.host_to_global_batch(_batch(64), mesh))
    results.append((toy.params_of(state), float(metrics["loss"]), float(metrics["grad_norm"])))
  chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[0][1:], results[1][1:], rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss():
  _, losses32, _, _ = _run("data:8", steps=2)
  state16, losses16, _, _ = _run("data:8", steps=2, compute_dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
  np.testing.assert_allclose(losses16, losses32, rtol=3e-2)


@pytest.mark.slow
def test_ema_is_sharded_like_params_and_averages():
  state, _, _, _ = _run("data:4,fsdp:2", steps=3, ema_decay=0.5)
  for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    assert p.sharding == e.sharding
  init = toy.init_params(jax.random.key(0))
  moved = [
    not np.allclose(np.asarray(e), np.asarray(i))
    for e, i in zip(
      jax.tree.leaves(state.ema_params),
      jax.tree.leaves(jax.tree.map(lambda b: b.value, init, is_leaf=lambda x: hasattr(x, "value"))),
    )
  ]
  assert any(moved)


def test_non_finite_loss_skips_the_update_and_reports_it():
  mesh = shd.make_mesh("data:8")
  tx, _ = toy.optimizer()
  _, shardings = train.abstract_train_state(toy.init_params, tx, mesh)
  state = train.init_train_state(toy.init_params, tx, shardings, jax.random.key(0))
  step = train.make_train_step(toy.loss_fn, tx, mesh, shardings)
  before = toy.params_of(state)
  bad = _batch()
  bad["x"] = bad["x"].copy()
  bad["x"][3] = np.nan
  state, metrics = step(state, shd.host_to_global_batch(bad, mesh))
  assert not bool(metrics["finite"])
  chex.assert_trees_all_equal(toy.params_of(state), before)
  assert int(state.step) == 1
