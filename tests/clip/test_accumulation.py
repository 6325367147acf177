"""CLIP's gradient accumulation trains the whole batch's loss: with grad_accum_steps = k the trainer's
gradient (`train.make_grad_fn` of the `EmbeddingLoss` that `clip.losses.make_loss_fn` returns) equals
the gradient of the loss over all the batch's pairs, computed here independently in one pass."""

import dataclasses
import functools
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from multimodal_jax import sharding as shd
from multimodal_jax import train
from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import losses
from multimodal_jax.clip import model as clip_model

BATCH = 32  # k = 4 microbatches of 8: one row per device on 8 devices
FSDP = "data:4,fsdp:2"
NORMALIZE = cdata.make_normalizer((0.5,), (0.25,))
SHIFT = 3  # every test augments: the two passes of a microbatch must draw the same shifts


def assert_close(actual, expected):
  """rtol 1e-5 and atol 1e-6, or 1e-5 of the leaf's largest |value| when that is more: a gradient is a sum over
  the batch, and float32 sums taken in another order (a scan over microbatches, another sharding) differ by about
  1e-6 of the largest terms (measured: 1.7e-6 on position embeddings whose gradient reaches 1.1), not of each
  element."""
  for a, e in zip(jax.tree.leaves(jax.device_get(actual)), jax.tree.leaves(jax.device_get(expected)), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=max(1e-6, 1e-5 * float(np.abs(e).max())))


def mesh_of(spec):
  return shd.make_mesh("data:1", jax.devices()[:1]) if spec == "one" else shd.make_mesh(spec)


@functools.cache
def model_of(loss):
  """The tiny preset with SigLIP's logit scale and bias for the sigmoid loss (as a run sets them); its layers run in a
  loop (not unrolled, CPU's default) to keep the many compiles here short."""
  cfg = dataclasses.replace(clip_model.PRESETS["tiny"], scan_unroll=1)
  if loss == "sigmoid":
    cfg = dataclasses.replace(cfg, init_logit_bias=-10.0, init_logit_scale=math.log(10.0))
  return clip_model.CLIP(cfg)


def init_params(loss):
  model = model_of(loss)
  return lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 1)), jnp.ones((1, 16), jnp.int32))["params"]


@functools.cache
def inputs(spec, loss):
  """(params, batch, rng) on the mesh: params in their FSDP layout, the batch split over the data axes."""
  mesh = mesh_of(spec)
  shardings = jax.tree.map(lambda a: a.sharding, train.abstract_params(init_params(loss), mesh))
  params = jax.jit(lambda rng: nn.meta.unbox(init_params(loss)(rng)), out_shardings=shardings)(jax.random.key(0))
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 16, BATCH)
  batch = {
    "image": rng.integers(0, 256, (BATCH, 32, 32, 1), dtype=np.uint8),
    "text": np.where(np.arange(16) < lengths[:, None], rng.integers(1, 1000, (BATCH, 16)), 0).astype(np.int32),
  }
  rng = jax.random.fold_in(jax.random.key(0), 0)  # what the train step draws at step 0 with seed 0
  return params, shd.host_to_global_batch(batch, mesh), rng


def config_of(loss, impl):
  return types.SimpleNamespace(loss=loss, loss_impl=impl, augment_shift=SHIFT)


PLAIN = {"softmax": losses.clip_softmax_loss, "sigmoid": losses.sigmoid_loss}


@functools.cache
def reference(loss, k):
  """jit(value_and_grad) of the loss of the whole batch, written out in one pass on one device with the plain
  (unsharded) loss: model.apply, microbatch i (rows i, i + k, ...) shifted with fold_in(rng, i) as the trainer draws
  it, the whole batch with rng itself when k = 1 (today's step). Every mesh's and loss implementation's case compares
  with it (the params and batch of `inputs` are the same on every mesh), so a sharded loss is checked against the
  plain one too, and each (loss, k) compiles once."""
  model = model_of(loss)

  def loss_fn(params, batch, rng):
    images = batch["image"]
    if k == 1:
      images = NORMALIZE(images, rng, SHIFT)
    else:
      parts = [NORMALIZE(images[i::k], jax.random.fold_in(rng, i), SHIFT) for i in range(k)]
      images = jnp.stack(parts, axis=1).reshape(images.shape)
    img, txt, scale, bias = model.apply({"params": params}, images, batch["text"])
    return PLAIN[loss](img, txt, scale, *((bias,) if loss == "sigmoid" else ()))

  return jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(*inputs("one", loss)))


def accumulated(spec, loss, impl, k, loss_fn=None):
  """`train.make_grad_fn` of CLIP's loss (or of `loss_fn`) with grad_accum_steps = k: (loss, aux, grads)."""
  mesh = mesh_of(spec)
  loss_fn = loss_fn or losses.make_loss_fn(model_of(loss), config_of(loss, impl), mesh, NORMALIZE)
  return jax.jit(train.make_grad_fn(loss_fn, mesh, grad_accum_steps=k))(*inputs(spec, loss))


# (mesh, loss, impl, k): each mesh, loss and impl, and k = 1, 2, 4 on each mesh and for each loss (on one device
# gather and chunked are the same plain loss). Every case compiles the accumulated gradient (seconds of CPU each) and
# shares the one-device reference of its (loss, k) with other cases, so not every product is here.
CASES = [
  ("one", "softmax", "gather", 1),
  ("one", "softmax", "gather", 4),
  ("one", "sigmoid", "gather", 2),
  (FSDP, "softmax", "gather", 2),
  (FSDP, "softmax", "chunked", 4),
  (FSDP, "sigmoid", "gather", 1),
  (FSDP, "sigmoid", "chunked", 4),
]
# Every case compiles one or two CLIP steps (tens of seconds on 2 cores): all in the whole suite; the fast subset keeps
# test_train.py's exact accumulation on a small model. CHECKED is the case the control below reuses.
CHECKED = (FSDP, "softmax", "gather", 2)


@pytest.mark.parametrize("spec, loss, impl, k", [pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_accumulated_gradient_is_the_whole_batch_gradient(spec, loss, impl, k):
  # catches accumulation that trains each microbatch's own loss (its negatives only), a second pass that draws
  # other augmentation shifts than the first, a k = 1 step whose randomness is not today's, a microbatch's
  # embedding gradient pulled back through another's rows (split and merge orders that disagree), a lost or
  # doubled logit scale/bias gradient, a reported loss that is not the whole batch's, and a sharded loss (gathered
  # or chunked, on the FSDP mesh) that is not the plain one
  expected_loss, expected_grads = reference(loss, k)
  loss_value, aux, grads = accumulated(spec, loss, impl, k)
  assert_close(loss_value, expected_loss)
  assert_close(grads, expected_grads)
  assert set(aux) == {"logit_scale"}


@pytest.mark.slow
def test_the_comparison_tells_other_gradients_apart():
  # catches a test that cannot fail: today's mean over microbatches (a plain loss function), and the whole-batch
  # loss with passes that draw different shifts, both give gradients far outside the tolerance used above
  spec, loss, impl, k = CHECKED
  mesh = mesh_of(spec)
  clip_loss = losses.make_loss_fn(model_of(loss), config_of(loss, impl), mesh, NORMALIZE)
  traces = itertools.count()  # each pass traces `embed` once: the second draws other shifts than the first

  def embed_with_other_keys(params, batch, rng):
    return clip_loss.embed(params, batch, jax.random.fold_in(rng, next(traces)))

  expected_loss, expected_grads = reference(loss, k)
  mean_loss, _, mean_grads = accumulated(spec, loss, impl, k, loss_fn=lambda *a: clip_loss(*a))
  assert float(mean_loss) < float(expected_loss) - 0.1  # fewer negatives: an easier task
  other_keys = train.EmbeddingLoss(embed_with_other_keys, clip_loss.loss_from_embeddings)
  _, _, mismatched_grads = accumulated(spec, loss, impl, k, loss_fn=other_keys)
  assert next(traces) == 2
  for grads in (mean_grads, mismatched_grads):
    leaves = zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True)
    assert max(float(np.abs(g - e).max() / np.abs(e).max()) for g, e in leaves) > 1e-2


@pytest.mark.slow
def test_train_step_updates_with_the_whole_batch_gradient_and_logs_its_loss():
  # catches a train step that does not route an EmbeddingLoss to the whole-batch gradient, or logs the mean of
  # the microbatches' losses: plain SGD with learning rate 1 moves the params by exactly the reference gradient
  spec, loss, impl, k = FSDP, "sigmoid", "chunked", 4
  mesh = mesh_of(spec)
  tx = optax.sgd(1.0)
  _, shardings = train.abstract_train_state(init_params(loss), tx, mesh)
  params, batch, _ = inputs(spec, loss)
  params = jax.tree.map(jnp.copy, params)  # the step donates its state: not the inputs other tests share
  state = jax.device_put(
    train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)), shardings
  )
  loss_fn = losses.make_loss_fn(model_of(loss), config_of(loss, impl), mesh, NORMALIZE)
  step = train.make_train_step(loss_fn, tx, mesh, shardings, grad_accum_steps=k)  # seed 0: the reference's rng
  before = jax.device_get(params)
  state, metrics = step(state, batch)
  expected_loss, expected_grads = reference(loss, k)
  assert_close(metrics["loss"], expected_loss)
  assert_close(metrics["grad_norm"], optax.tree.norm(expected_grads))
  assert_close(state.params, jax.tree.map(lambda p, g: p - g, before, expected_grads))
