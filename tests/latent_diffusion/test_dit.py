"""The DiT denoiser: shapes, adaLN-zero init, context masking, scan vs unrolled, training, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from multimodal_jax import sharding as shd
from multimodal_jax import train
from multimodal_jax.latent_diffusion import diffusion as df
from multimodal_jax.latent_diffusion import dit

SMALL = dit.DiTConfig(input_size=4, in_channels=2, patch_size=2, width=32, depth=2, num_heads=2, context_dim=8)


def _inputs(cfg, batch=3, length=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, batch).astype(np.int32)
  ctx = rng.normal(size=(batch, length, cfg.context_dim)).astype(np.float32)
  mask = np.ones((batch, length), bool)
  mask[0, 2:] = False
  mask[1, :] = False
  return x, t, ctx, mask


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg, seed=0):
  return nn.meta.unbox(dit.DiT(cfg).init(jax.random.key(seed), *_inputs(cfg))["params"])


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, t, ctx, mask):
  return dit.DiT(cfg).apply({"params": params}, x, t, ctx, mask)


def _perturbed(params, seed=1, scale=0.2):
  """Params with every leaf moved off its init (so that the zero-initialised layers act)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [p + scale * rng.normal(size=p.shape).astype(np.float32) for p in leaves])


@pytest.mark.parametrize("preset", ["S", "B", "L", "XL"])
def test_presets_have_the_paper_sizes_and_output_shapes(preset):
  cfg = dit.dit_config(preset, input_size=32, context_dim=768, learn_sigma=preset == "XL")
  widths = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
  assert (cfg.width, cfg.depth, cfg.num_heads) == widths[preset]
  model = dit.DiT(cfg)
  args = (jnp.zeros((2, 32, 32, 4)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 7, 768)), jnp.ones((2, 7), bool))
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *args)["params"]))
  assert params["blocks"]["fc1"]["kernel"].shape == (cfg.depth, cfg.width, 4 * cfg.width)
  out = jax.eval_shape(lambda p: model.apply({"params": p}, *args), params)
  assert out.shape == (2, 32, 32, 8 if cfg.learn_sigma else 4) and out.dtype == jnp.float32


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    pytest.param({"patch_size": 1, "learn_sigma": True}, marks=pytest.mark.slow),
    pytest.param({"input_size": 8, "patch_size": 4, "remat": True}, marks=pytest.mark.slow),
  ],
)
def test_small_variants_run_with_exact_shapes_and_zero_output_at_init(overrides):
  cfg = dataclasses.replace(SMALL, **overrides)
  x, t, ctx, mask = _inputs(cfg)
  out = _apply(cfg, _init(cfg), x, t, ctx, mask)
  assert out.shape == (3, cfg.input_size, cfg.input_size, cfg.out_channels)
  np.testing.assert_array_equal(out, 0.0)  # adaLN-zero and the zero output layer


@pytest.mark.slow
def test_tiny_preset_runs_on_8x8x4_latents():
  cfg = dit.dit_config("tiny")
  x, t, ctx, mask = _inputs(cfg, batch=2, length=8)
  shapes = jax.eval_shape(_init, cfg)
  params = _perturbed(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), scale=0.05)
  out = _apply(cfg, params, x, t, ctx, mask)
  assert out.shape == (2, 8, 8, 4) and np.all(np.isfinite(out)) and np.abs(out).max() > 0


@pytest.mark.slow
def test_masked_context_tokens_have_no_effect_and_all_false_is_unconditional():
  cfg = SMALL
  x, t, ctx, mask = _inputs(cfg)
  params = _perturbed(_init(cfg))
  base = _apply(cfg, params, x, t, ctx, mask)
  changed = ctx.copy()
  changed[0, 3] = 100.0  # masked in example 0
  changed[1] = np.random.default_rng(5).normal(size=changed[1].shape)  # example 1: nothing unmasked
  changed[1, 0] = np.nan
  out = _apply(cfg, params, x, t, changed, mask)
  np.testing.assert_array_equal(out[:2], base[:2])
  # Unmasked tokens do matter (the test above could otherwise pass trivially).
  changed[0, 0] += 1.0
  changed[2, 4] += 1.0
  out = _apply(cfg, params, x, t, changed, mask)
  assert np.abs(out[0] - base[0]).max() > 1e-4 and np.abs(out[2] - base[2]).max() > 1e-4
  # All-False is the same "no condition" whatever the context length and values.
  none_a = _apply(cfg, params, x, t, ctx, np.zeros_like(mask))
  none_b = _apply(cfg, params, x, t, np.zeros((3, 2, cfg.context_dim), np.float32), np.zeros((3, 2), bool))
  np.testing.assert_allclose(none_a, none_b, rtol=1e-6, atol=1e-6)
  assert np.abs(none_a[2] - base[2]).max() > 1e-4


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.slow
def test_scan_and_unrolled_layers_give_the_same_output(remat):
  cfg = dataclasses.replace(SMALL, remat=remat)
  x, t, ctx, mask = _inputs(cfg)
  params = _perturbed(_init(cfg))
  scanned = _apply(cfg, params, x, t, ctx, mask)
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled_params = dit.unscanned_params(params, cfg.depth)
  assert jax.tree.structure(unrolled_params) == jax.tree.structure(_init(unrolled_cfg))
  unrolled = _apply(unrolled_cfg, unrolled_params, x, t, ctx, mask)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)
  assert np.abs(scanned).max() > 1e-3


def _toy_problem(cfg, batch):
  """Class-conditional point masses: class k's sample is a fixed pattern, its context a fixed token."""
  rng = np.random.default_rng(0)
  patterns = rng.choice([-1.0, 1.0], size=(4, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
  tokens = rng.normal(size=(4, 1, cfg.context_dim)).astype(np.float32)
  labels = np.arange(batch) % 4
  return {"x0": patterns[labels], "context": tokens[labels], "mask": np.ones((batch, 1), bool)}


def _setup(cfg, mesh, tx):
  model = dit.DiT(cfg)
  schedule = df.make_schedule("linear", 100, 1e-4, 0.02)
  batch = _toy_problem(cfg, 32)

  def init_params(rng):
    return model.init(rng, batch["x0"][:1], np.zeros(1, np.int32), batch["context"][:1], batch["mask"][:1])["params"]

  def loss_fn(params, b, rng):
    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, b["context"], b["mask"])

    return df.diffusion_loss(model_fn, schedule, b["x0"], rng)

  _, shardings = train.abstract_train_state(init_params, tx, mesh)
  state = train.init_train_state(init_params, tx, shardings, jax.random.key(0))
  step = train.make_train_step(loss_fn, tx, mesh, shardings)
  return state, step, shd.host_to_global_batch(batch, mesh), loss_fn


@pytest.mark.slow
def test_eps_training_on_a_3d_mesh_shards_params_and_makes_the_loss_fall():
  mesh = shd.make_mesh("data:2,fsdp:2,tensor:2")
  state, step, batch, loss_fn = _setup(SMALL, mesh, optax.adamw(3e-3))
  assert tuple(state.params["blocks"]["fc1"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")
  assert tuple(state.params["blocks"]["attn"]["qkv"]["kernel"].sharding.spec) == (None, "fsdp", None, "tensor", None)
  assert tuple(state.params["blocks"]["modulation"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")
  host_params = jax.device_get(state.params)
  host_batch = jax.device_get(batch)
  inputs = _inputs(SMALL)
  np.testing.assert_array_equal(_apply(SMALL, host_params, *inputs), 0.0)
  # The sharded step computes the single-device loss (the step's rng is fold_in(key(0), step)).
  expect, _ = jax.jit(loss_fn)(host_params, host_batch, jax.random.fold_in(jax.random.key(0), 0))
  losses = []
  for i in range(150):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    if i == 0:
      np.testing.assert_allclose(losses[0], expect, rtol=1e-5)
      assert np.abs(_apply(SMALL, jax.device_get(state.params), *inputs)).max() > 1e-4  # nonzero after one step
  assert step._cache_size() == 1
  assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30]), (np.mean(losses[:30]), np.mean(losses[-30:]))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="preset"):
    dit.dit_config("M")
  cfg = SMALL
  x, t, ctx, mask = _inputs(cfg)
  with pytest.raises(ValueError, match="expects 4x4x2"):
    dit.DiT(cfg).init(jax.random.key(0), np.zeros((3, 8, 8, 2)), t, ctx, mask)
  with pytest.raises(ValueError, match="context"):
    dit.DiT(cfg).init(jax.random.key(0), x, t, ctx[..., :3], mask)
