"""AVDCNN: model shapes and sizes, the loss, batch norm at inference, a short fit, the speech-quality
scores, and the feature / enhancement pipeline of the experiment on fake utterances."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from multimodal_jax import audio
from multimodal_jax.avdcnn import enhance, losses
from multimodal_jax.avdcnn import frames as frames_lib
from multimodal_jax.avdcnn import losses as exp_losses
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.avdcnn.losses import avdcnn_loss

AV = avdcnn.AVDCNNConfig()
AUDIO_ONLY = avdcnn.AVDCNNConfig(modalities=("audio",))
EARLY = avdcnn.AVDCNNConfig(fusion="early")
TINY = avdcnn.PRESETS["tiny"]
from tests.avdcnn.test_frames import _fake_examples
from tests.xla_flags import optimized


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "audio": rng.normal(size=(n, 257, 5)).astype(np.float32),
    "lips": rng.integers(0, 256, size=(n, 5, 16, 24, 3), dtype=np.uint8),
    "target": rng.normal(size=(n, 257)).astype(np.float32),
  }


def _init(config, seed=0):
  model = avdcnn.AVDCNN(config)
  boxed = jax.jit(avdcnn.make_init_params(model))(jax.random.key(seed))
  return model, boxed, nn.meta.unbox(boxed)


def _train_apply(model, params, batch, seed=0):
  return jax.jit(lambda p, b: avdcnn.apply_train(model, p, b, jax.random.key(seed)))(params, batch)


def _infer(model, params, stats, batch):
  return jax.jit(lambda p, s, b: avdcnn.apply_inference(model, p, s, b))(params, stats, batch)


@pytest.mark.parametrize(
  "config, widths, heads",
  [
    (AV, {"audio": 1904, "visual": 924}, {"audio": 257, "visual": 1152}),
    (AUDIO_ONLY, {"audio": 1904}, {"audio": 257}),
    (EARLY, {"early": 11120}, {"audio": 257, "visual": 1152}),
  ],
)
def test_shapes_and_flattened_widths(config, widths, heads):
  # shapes only (eval_shape): the paper-sized model is never compiled here
  model = avdcnn.AVDCNN(config)
  boxed = jax.eval_shape(avdcnn.make_init_params(model), jax.random.key(0))
  params = nn.meta.unbox(boxed)
  assert avdcnn.flat_widths(config) == widths
  # the first FC layer sees exactly the derived concatenation (2,828 for AV, not the paper's 2,804)
  assert params["fc_0"]["kernel"].shape == (sum(widths.values()), 1000)
  assert params["fc_1"]["kernel"].shape == (1000, 800)
  assert ("visual_cnn" in params) == (config.visual and config.fusion == "joint")
  out = jax.eval_shape(lambda p, b: avdcnn.apply_train(model, p, b, jax.random.key(1)), params, _batch(3))
  assert {k: v.shape for k, v in out.items()} == {k: (3, n) for k, n in heads.items()}
  # every parameter carries logical axis names of the sharding table
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim


@pytest.mark.slow
def test_residual_head_starts_as_the_identity_the_gain_head_below_it_and_the_plain_head_does_not():
  batch = _batch(4)
  centre = batch["audio"][:, :, 2]
  tiny_audio = dataclasses.replace(TINY, modalities=("audio",))
  model, _, params = _init(dataclasses.replace(tiny_audio, head="residual"))
  np.testing.assert_array_equal(_train_apply(model, params, batch)["audio"], centre)
  model, _, params = _init(dataclasses.replace(tiny_audio, head="gain"))
  out = _train_apply(model, params, batch)["audio"]
  np.testing.assert_allclose(centre - out, np.log1p(np.exp(-3.0)), rtol=1e-4)  # softplus(gain_bias)
  # attenuation only: whatever the weights, the gain head never exceeds the noisy centre frame
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
  out = _train_apply(model, params, batch)["audio"]
  assert np.all(np.asarray(out) <= centre) and np.abs(out - centre).mean() > 0.1
  model, _, params = _init(dataclasses.replace(tiny_audio, head="plain"))
  out = _train_apply(model, params, batch)
  assert out["audio"].shape == (4, 257) and np.abs(out["audio"] - centre).mean() > 0.1


def test_av_width_differs_from_the_papers_2804():
  paper = 2804
  assert sum(avdcnn.flat_widths(AV).values()) == 2828 != paper


@pytest.mark.parametrize(
  "x_shape, kernel_shape",
  [
    ((3, 257, 5, 1), (12, 2, 1, 10)),
    pytest.param((3, 24, 80, 3), (15, 2, 3, 12), marks=pytest.mark.slow),
    pytest.param((2, 10, 79, 12), (7, 2, 12, 10), marks=pytest.mark.slow),
  ],
)
def test_banded_conv_equals_lax_conv_with_gradients(x_shape, kernel_shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)

  def lax_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  ref = lax_conv(x, kernel)
  np.testing.assert_allclose(avdcnn.banded_conv(x, kernel), ref, atol=1e-5 * float(jnp.abs(ref).max()))
  cotangent = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)

  def vjp(conv):
    return jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent), (0, 1))(x, kernel)

  grads = [vjp(lax_conv), vjp(avdcnn.banded_conv)]
  for ours, theirs in zip(grads[1], grads[0]):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(jnp.abs(theirs).max()))


def test_max_pool_equals_flax_max_pool_in_values_and_gradients():
  # Catches a wrong window layout (values), a gradient spread over a window or given to the wrong element, and a
  # NaN activation that pooling hides (nn.max_pool on XLA:CPU does: the NaN check is against numpy's max).
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 245, 4, 10)), jnp.float32)
  for window in ((2, 1), (3, 2)):
    ours, theirs = avdcnn.max_pool(x, window), nn.max_pool(x, window, strides=window)
    np.testing.assert_array_equal(ours, theirs)
    pooled = np.asarray(avdcnn.max_pool(x.at[0, 7, 1, 3].set(jnp.nan), window))  # a NaN is not hidden
    assert np.argwhere(np.isnan(pooled)).tolist() == [[0, 7 // window[0], 1 // window[1], 3]]
    cotangent = jnp.asarray(rng.normal(size=ours.shape), jnp.float32)
    ours, theirs = (
      jax.grad(lambda x, w=window, c=cotangent: jnp.sum(avdcnn.max_pool(x, w) * c))(x),
      jax.grad(lambda x, w=window, c=cotangent: jnp.sum(nn.max_pool(x, w, strides=w) * c))(x),
    )
    np.testing.assert_array_equal(ours, theirs)


def test_conv_bn_then_max_pool_has_finite_gradients_when_xla_recomputes_the_producer():
  # Catches max_pool as `.max()` again: under the suite's XLA:CPU -O0 (tests/conftest.py) the batch norm is
  # recomputed for the max's gradient, differs in the last bit, and the first audio conv's gradients are all NaN.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 257, 5, 1)), jnp.float32)
  conv = avdcnn.ConvBN(10, (12, 2), "xla")
  variables = conv.init(jax.random.key(0), x, True)

  def loss(params):
    y, _ = conv.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
    return jnp.sum(avdcnn.max_pool(y, (2, 1)) ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), grads


@pytest.mark.slow
def test_conv_impls_share_parameters_and_agree():
  rng = np.random.default_rng(1)
  batch = {"audio": rng.normal(size=(4, 257, 5)).astype(np.float32), "lips": rng.integers(0, 255, (4, 5, 16, 24, 3))}
  batch["lips"] = batch["lips"].astype(np.uint8)
  outputs = {}
  for impl in avdcnn.CONV_IMPLS:
    model = avdcnn.AVDCNN(dataclasses.replace(avdcnn.PRESETS["paper"], conv_impl=impl, head="residual"))
    init = jax.jit(functools.partial(model.init, train=False))  # jit: one compile, not one an op
    params = init({"params": jax.random.key(0)}, *avdcnn.model_inputs(batch, model.config))["params"]
    params = jax.tree.map(lambda p: p + 0.01, params)  # the residual head's zero weights would hide the CNNs
    outputs[impl] = (params, jax.jit(functools.partial(avdcnn.apply_train, model))(params, batch, jax.random.key(1)))
  reference_params, reference = outputs["xla"]
  for impl in ("auto", "banded"):
    params, out = outputs[impl]
    assert jax.tree.structure(params) == jax.tree.structure(reference_params)
    jax.tree.map(np.testing.assert_array_equal, params, reference_params)
    for key in ("audio", "visual"):
      np.testing.assert_allclose(out[key], reference[key], atol=1e-4 * float(jnp.abs(reference[key]).max()))
  assert avdcnn.use_banded(24, 15, "auto") and not avdcnn.use_banded(257, 12, "auto")


def test_lips_layout_puts_frames_side_by_side_transposed():
  lips = np.arange(2 * 5 * 16 * 24 * 3).reshape(2, 5, 16, 24, 3)
  laid = np.asarray(avdcnn.lips_layout(jnp.asarray(lips)))
  assert laid.shape == (2, 24, 80, 3)
  np.testing.assert_array_equal(laid[1, :, 16 * 3 : 16 * 4], lips[1, 3].transpose(1, 0, 2))


def test_loss_equals_the_formula():
  rng = np.random.default_rng(0)
  y_hat, y = rng.normal(size=(2, 6, 257))
  v_hat, v = rng.normal(size=(2, 6, 1152))
  loss, parts = avdcnn_loss(y_hat, y, v_hat, v, mu=0.7)
  expected = np.mean(np.sum((y_hat - y) ** 2, -1)) + 0.7 * np.mean(np.sum((v_hat - v) ** 2, -1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(parts["audio_loss"]), np.mean(np.sum((y_hat - y) ** 2, -1)), rtol=1e-5)
  audio_only, parts = avdcnn_loss(y_hat, y)
  assert set(parts) == {"audio_loss"}
  np.testing.assert_allclose(float(audio_only), np.mean(np.sum((y_hat - y) ** 2, -1)), rtol=1e-5)
  # under_weight scales only the errors below the target (over-suppression)
  weighted, _ = avdcnn_loss(y_hat, y, under_weight=3.0)
  w = np.where(y_hat < y, 3.0, 1.0)
  np.testing.assert_allclose(float(weighted), np.mean(np.sum(w * (y_hat - y) ** 2, -1)), rtol=1e-5)


@pytest.mark.slow
def test_population_statistics_and_batch_independent_inference():
  model, _, params = _init(TINY)
  data = _batch(64, seed=1)
  halves = [{k: v[:32] for k, v in data.items()}, {k: v[32:] for k, v in data.items()}]
  stats = avdcnn.population_batch_stats(model, params, halves)
  # the first layer's inputs do not depend on BN: its population stats are those of all 64 conv outputs
  audio_in, _ = avdcnn.model_inputs(data, TINY)
  conv = params["audio_cnn"]["conv_0"]["conv"]
  out = jax.lax.conv_general_dilated(
    audio_in[..., None], conv["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  out = np.asarray(out + conv["bias"]).reshape(-1, 10)
  first = stats["audio_cnn"]["conv_0"]["bn"]
  np.testing.assert_allclose(first["mean"], out.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(first["var"], out.var(0), rtol=1e-3, atol=1e-5)
  # inference of a row does not depend on the rows beside it
  alone = _infer(model, params, stats, {k: v[:1] for k, v in data.items()})
  mixed = _infer(model, params, stats, {k: v[[0, 5, 9]] for k, v in data.items()})
  for key in ("audio", "visual"):
    np.testing.assert_allclose(alone[key][0], mixed[key][0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_few_hundred_steps_reduce_the_loss_on_a_tiny_problem():
  """Target: the centre frame plus a spectral shape scaled by its low-band level and a level the mouth's
  opening decides."""
  model, _, params = _init(TINY)
  loss_fn = exp_losses.make_loss_fn(model, mu=0.1)
  rng = np.random.default_rng(0)

  closed, open_ = rng.integers(0, 256, size=(2, 16, 24, 3))
  shape = np.hanning(257)

  def make_batch(n):
    b = _batch(n, seed=int(rng.integers(1 << 30)))
    opening = rng.uniform(size=(n, 5, 1, 1, 1))
    b["lips"] = np.round((1 - opening) * closed + opening * open_).astype(np.uint8)  # a mouth between two shapes
    low_band = b["audio"][:, :64, 2].mean(-1, keepdims=True)  # the centre frame's mean low-band level
    correction = 4.0 * low_band * shape + 2.0 * opening[:, 2, 0, 0] - 1.0
    b["target"] = (b["audio"][:, :, 2] + correction).astype(np.float32)
    return b

  tx = optax.adam(2e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, key):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss, parts

  losses, audio_losses = [], []
  with optimized():  # 300 runs of one step: XLA's default optimization pays for its longer compile
    for i in range(300):
      params, opt, loss, parts = step(params, opt, make_batch(32), jax.random.key(i))
      losses.append(float(loss))
      audio_losses.append(float(parts["audio_loss"]))
  assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
  assert np.mean(audio_losses[-20:]) < 0.6 * np.mean(audio_losses[:20])


# --- speech quality ---------------------------------------------------------------------------------------------


# --- features and enhancement (experiment pipeline, fake utterances) --------------------------------------------------


def test_compressed_magnitude_is_the_scaled_power_law_of_the_magnitude():
  # the fast check of the compressed target (the slow test below runs it through the model's loss_fn)
  rng = np.random.default_rng(1)
  normalized, mean, std = rng.normal(size=(3, 4, 9))
  std = np.abs(std) + 0.5
  power = np.exp(normalized * std + mean)  # |S|^2
  expected = np.sqrt(losses.COMPRESSED_SCALE) * np.sqrt(power) ** losses.COMPRESSION
  got = losses.compressed_magnitude(jnp.asarray(normalized), jnp.asarray(mean), jnp.asarray(std))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  assert losses.COMPRESSION == 0.3 and losses.COMPRESSED_SCALE == 50.0


@pytest.mark.slow
def test_compressed_loss_is_the_squared_error_of_compressed_magnitudes():
  examples = _fake_examples(2)
  model, _, params = _init(TINY)
  source = frames_lib.FrameSource(examples, floor=-4.0)
  batch = source.batch(np.arange(0, len(source), 3))
  loss_fn = jax.jit(exp_losses.make_loss_fn(model, mu=0.5, loss="compressed"))
  loss, parts = loss_fn(params, batch, jax.random.key(0))
  out = _train_apply(model, params, batch)

  def magnitude(normalized):  # |S|^0.3 from the normalized log power |S|^2, by hand
    power = np.exp(np.asarray(normalized, np.float64) * batch["std"] + batch["mean"])
    return np.sqrt(power) ** 0.3

  by_hand = losses.COMPRESSED_SCALE * np.mean(np.sum((magnitude(out["audio"]) - magnitude(batch["target"])) ** 2, -1))
  np.testing.assert_allclose(parts["audio_loss"], by_hand, rtol=1e-4)
  assert loss == pytest.approx(float(parts["audio_loss"]) + 0.5 * float(parts["visual_loss"]), rel=1e-5)
  # the visual target is the normalized centre mouth image
  centre = np.asarray(batch["lips"][:, 2], np.float32) / 255.0
  flat = centre.reshape(len(centre), -1)
  expected = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-3)
  np.testing.assert_allclose(avdcnn.lips_target(batch["lips"]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_enhancer_equals_the_unpadded_pipeline_and_keeps_the_length():
  examples = _fake_examples(2)
  model, _, params = _init(TINY)
  source = frames_lib.FrameSource(examples, floor=-4.0)
  stats = avdcnn.population_batch_stats(model, params, [source.batch(np.arange(len(source)))])
  enhancer = enhance.Enhancer(model, params, stats)
  ex = examples[1]
  enhanced = enhancer(ex["noisy"], ex["lips"])
  assert enhanced.shape == ex["noisy"].shape and enhanced.dtype == np.float32
  # by hand, at the exact length: features -> model per frame -> de-normalize -> resynthesis
  offset = len(examples[0]["lips"])
  frames = source.batch(np.arange(offset, len(source)))
  out = np.asarray(_infer(model, params, stats, frames)["audio"])
  spectrum = audio.stft(ex["noisy"])
  _, mean, std = audio.normalize_utterance(audio.log_power(spectrum))
  expected = audio.resynthesize(out * std + mean, spectrum, len(ex["noisy"]))
  np.testing.assert_allclose(enhanced, expected, rtol=1e-3, atol=2e-5)
  with pytest.raises(ValueError, match="sees the lips"):
    enhancer(ex["noisy"], None)


@pytest.mark.slow
def test_batch_stats_shapes_are_those_of_the_population_statistics():
  model, _, params = _init(TINY)
  stats = avdcnn.population_batch_stats(model, params, [_batch(8)])
  shapes = avdcnn.batch_stats_shapes(model)
  assert jax.tree.structure(shapes) == jax.tree.structure(stats)
  same = jax.tree.leaves(jax.tree.map(lambda s, x: s.shape == x.shape and s.dtype == x.dtype, shapes, stats))
  # catches a stats leaf of the wrong shape or dtype (a bare list of Falses is truthy) and an empty tree
  assert same and all(same), same


# --- model state in the train state (loop.fit's model_state_fn) ------------------------------------------------------


def _fit_with_state(workdir, steps, calls, ema_decay=0.0):
  from multimodal_jax import loop
  from tests import toy

  def model_state_fn(params):  # any function of the saved params: here their sums per leaf
    calls.append(1)
    return {"sums": [jnp.sum(x) for x in jax.tree.leaves(params)]}

  config = loop.base_config(steps=steps, batch_size=32, seed=3, checkpoint_every=4, ema_decay=ema_decay)
  return toy.fit(workdir, config, model_state_fn=model_state_fn)


@pytest.mark.slow
def test_model_state_is_saved_from_the_saved_params_and_resumes_bit_identically(tmp_path):
  import chex

  from multimodal_jax import sharding as shd
  from multimodal_jax.eval import from_checkpoint
  from tests import toy

  calls = []
  full = _fit_with_state(tmp_path / "full", 12, calls, ema_decay=0.9)
  assert len(calls) == 3 + 1  # once for the shapes (abstractly), then before each save (4, 8, 12)
  _fit_with_state(tmp_path / "resumed", 8, [], ema_decay=0.9)
  resumed = _fit_with_state(tmp_path / "resumed", 12, [], ema_decay=0.9)
  assert resumed.start_step == 8
  chex.assert_trees_all_equal(jax.device_get(resumed.state.model_state), jax.device_get(full.state.model_state))
  chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(full.state.params))
  # the state is that of the EMA params (the ones saved for inference), and restores with them
  sums = [np.asarray(jnp.sum(x)) for x in jax.tree.leaves(full.state.ema_params)]
  chex.assert_trees_all_close(jax.device_get(full.state.model_state)["sums"], sums, rtol=1e-6)
  shapes = {"sums": [jax.ShapeDtypeStruct((), jnp.float32) for _ in sums]}
  step, params, state = from_checkpoint.restore_params(
    str(tmp_path / "full"), toy.init_params, shd.make_mesh("data:-1"), model_state=shapes
  )
  assert step == 12
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(full.state.model_state))
  chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(full.state.ema_params))
