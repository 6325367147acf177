"""The train step: sharded init, equality across meshes, accumulation, dtype, EMA, NaN guard."""

import re

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


# The 3-D mesh (every axis split) stays in the fast subset: sharded = single device is a core invariant.
@pytest.mark.parametrize(
  "mesh_spec",
  [pytest.param("data:8", marks=pytest.mark.slow), pytest.param("data:4,fsdp:2", marks=pytest.mark.slow),
   "data:2,fsdp:2,tensor:2"],
)  # fmt: skip
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


def test_accumulated_microbatch_i_draws_fold_in_of_the_step_rng_and_i():
  # Catches microbatches that share the step's rng (the same dropout masks k times), draw fold_in(rng, i) in another
  # order, take other rows than i, i + k, ..., or sum instead of averaging: with dropout on, the accumulated gradient
  # equals the mean of the k microbatch gradients computed one by one with fold_in(rng, i).
  mesh = shd.make_mesh("data:4,fsdp:2")
  params = jax.jit(lambda: jax.tree.map(jnp.asarray, toy.init_params(jax.random.key(0))))()
  batch, rng, k = shd.host_to_global_batch(_batch(64), mesh), jax.random.key(7), 4
  loss, _, grads = jax.jit(train.make_grad_fn(toy.loss_fn, mesh, grad_accum_steps=k))(params, batch, rng)

  @jax.jit
  def by_hand(params, batch, rng):
    parts = [
      jax.value_and_grad(lambda p, i=i: toy.loss_fn(p, jax.tree.map(lambda x: x[i::k], batch), jax.random.fold_in(rng, i))[0])(params)
      for i in range(k)
    ]  # fmt: skip
    return jax.tree.map(lambda *xs: sum(xs) / k, *parts)

  want_loss, want_grads = by_hand(params, batch, rng)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-7)
  shared = jax.jit(train.make_grad_fn(lambda p, b, r: toy.loss_fn(p, b, rng), mesh, grad_accum_steps=k))
  # control: the same rng in every microbatch gives another gradient, so the comparison above can tell them apart
  assert not np.allclose(jax.tree.leaves(shared(params, batch, rng)[2])[0], jax.tree.leaves(want_grads)[0], atol=1e-6)


_DOT_OPERANDS = re.compile(r"stablehlo\.dot_general .*: \(tensor<[\dx]*x(\w+)>, tensor<[\dx]*x(\w+)>\)")


def _dot_operand_dtypes(step, state, mesh):
  """The operand dtypes of every dot_general in the lowered step (StableHLO text)."""
  text = step.lower(state, shd.host_to_global_batch(_batch(), mesh)).as_text()
  return [m.groups() for m in _DOT_OPERANDS.finditer(text)]


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss():
  state32, losses32, step32, _ = _run("data:8", steps=2)
  state16, losses16, step16, _ = _run("data:8", steps=2, compute_dtype=jnp.bfloat16)
  # catches params stored (and updated) in bfloat16 instead of kept float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
  np.testing.assert_allclose(losses16, losses32, rtol=3e-2)
  mesh = shd.make_mesh("data:8")
  dots16, dots32 = _dot_operand_dtypes(step16, state16, mesh), _dot_operand_dtypes(step32, state32, mesh)
  # catches a compute_dtype that is ignored (matmuls left float32): every matmul is bf16, the 2 forward and the
  # 3 backward ones (no gradient for the input x)
  assert len(dots16) == 5 and all(d == ("bf16", "bf16") for d in dots16), dots16
  # control for the pattern above: the float32 step's matmuls are float32, so the check can tell them apart
  assert len(dots32) == len(dots16) and all(d == ("f32", "f32") for d in dots32), dots32
  # catches a bfloat16 run that computes in float32 anyway: rounding inputs and weights to 8 mantissa bits
  # moves the loss by ~1e-4 here (measured 3e-4 and 1e-4), far above float32 reassociation noise (~1e-7)
  assert np.abs(np.subtract(losses16, losses32)).max() > 1e-5, (losses16, losses32)


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


def test_ema_follows_decay_times_ema_plus_one_minus_decay_times_the_updated_params():
  decay = 0.9  # not 0.5, where e*d + (1-d)*p and the swapped e*(1-d) + d*p coincide
  mesh = shd.make_mesh("data:4,fsdp:2")
  tx, _ = toy.optimizer()
  _, shardings = train.abstract_train_state(toy.init_params, tx, mesh, ema=True)
  state = train.init_train_state(toy.init_params, tx, shardings, jax.random.key(0), ema=True)
  step = train.make_train_step(toy.loss_fn, tx, mesh, shardings, ema_decay=decay)
  # catches an EMA that starts anywhere but the initial params (zeros, say)
  chex.assert_trees_all_equal(jax.device_get(state.ema_params), toy.params_of(state))
  expected = toy.params_of(state)
  for i in range(5):
    before = toy.params_of(state)  # the step donates its state: read it on the host first
    state, _ = step(state, shd.host_to_global_batch(_batch(offset=32 * i), mesh))
    params = toy.params_of(state)
    # catches an EMA of the params before the update, which this check would confuse with the new ones
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)))
    expected = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, expected, params)
    # catches the swapped weights (e*(1-d) + d*p), an EMA that copies the params, one of the old params, or
    # one that never moves: each is off by ~(1-d) x the update or more, far outside float32 rounding
    chex.assert_trees_all_close(jax.device_get(state.ema_params), expected, rtol=1e-6, atol=1e-7)
  # the check above is sharp: after 5 steps the EMA is measurably away from both the params and the init
  ema = jax.device_get(state.ema_params)
  assert max(np.abs(e - p).max() for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params))) > 1e-4


def test_each_step_draws_fold_in_of_the_seed_and_the_step():
  # The toy model has dropout, so the loss depends on the rng: each step's loss is the loss of the params it
  # started from with fold_in(key(seed), step), on the same batch every step.
  mesh = shd.make_mesh("data:8")
  tx, _ = toy.optimizer()
  _, shardings = train.abstract_train_state(toy.init_params, tx, mesh)
  state = train.init_train_state(toy.init_params, tx, shardings, jax.random.key(0))
  step = train.make_train_step(toy.loss_fn, tx, mesh, shardings, seed=5)
  batch = _batch()
  loss_of = jax.jit(lambda params, rng: toy.loss_fn(params, batch, rng)[0])
  for i in range(3):
    params = toy.params_of(state)  # the step donates its state: read it on the host first
    state, metrics = step(state, shd.host_to_global_batch(batch, mesh))
    expected = float(loss_of(params, jax.random.fold_in(jax.random.key(5), i)))
    # catches a step whose rng ignores the step (the same dropout mask every step), the seed, or the fold_in
    wrong_keys = [
      jax.random.key(5),
      jax.random.fold_in(jax.random.key(5), i + 1),
      jax.random.fold_in(jax.random.key(0), i),
    ]
    others = [float(loss_of(params, k)) for k in wrong_keys]
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    # the check above is sharp: the wrong keys move this loss by far more than the tolerance
    assert all(abs(o - expected) > 1e-3 * abs(expected) for o in others), (expected, others)


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


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def test_logged_norms_are_those_of_the_gradient_the_new_params_and_the_update():
  # catches a swapped pair (param_norm reporting the update's), the old params' norm instead of the new ones',
  # the gradient's norm logged as the update's, and a norm that leaves out leaves: on the 3-D mesh, where every
  # leaf's sum of squares is a partial sum on each device
  mesh = shd.make_mesh("data:2,fsdp:2,tensor:2")
  tx, _ = toy.optimizer(lr=0.1)  # a large step: old and new params' norms differ by far more than the tolerance
  _, shardings = train.abstract_train_state(toy.init_params, tx, mesh)
  state = train.init_train_state(toy.init_params, tx, shardings, jax.random.key(0))
  step = train.make_train_step(toy.loss_fn, tx, mesh, shardings)
  grad_fn = jax.jit(jax.grad(lambda p, b, r: toy.loss_fn(p, b, r)[0]))
  for i in range(2):
    before = toy.params_of(state)  # the step donates its state: read it on the host first
    batch = _batch(offset=32 * i)
    grads = grad_fn(before, batch, jax.random.fold_in(jax.random.key(0), i))  # the step's rng (seed 0)
    state, metrics = step(state, shd.host_to_global_batch(batch, mesh))
    after = toy.params_of(state)
    expected = {
      "grad_norm": _norm(grads),
      "param_norm": _norm(after),
      "update_norm": _norm(jax.tree.map(np.subtract, after, before)),
    }
    assert abs(_norm(after) - _norm(before)) > 1e-3 * _norm(after)  # the control: old and new norms differ
    for name, value in expected.items():
      np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, err_msg=name)
