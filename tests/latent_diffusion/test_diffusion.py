"""The diffusion core against diffusers' DDPMScheduler / DDIMScheduler, CFG, the jitted sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax.latent_diffusion import diffusion as df

try:  # the reference implementation, for the parity tests only: the rest (CFG, the loss, the sampler) need neither
  import diffusers
  import torch
except ImportError:
  diffusers = torch = None

# Per test, not for the module: a module-level importorskip hid every torch-free test where PyTorch is missing.
needs_diffusers = pytest.mark.skipif(torch is None, reason="the parity tests need PyTorch and diffusers")

TOL = {"rtol": 1e-5, "atol": 1e-5}
SHAPE = (3, 4, 4, 2)
DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def _randn(seed, shape=SHAPE):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _scheduler(cls, kind="scaled_linear", prediction="epsilon", clip=None, T=1000, **kw):
  return cls(
    num_train_timesteps=T,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule=DIFFUSERS_KIND[kind],
    prediction_type=DIFFUSERS_PREDICTION[prediction],
    clip_sample=clip is not None,
    clip_sample_range=1.0 if clip is None else clip,
    **kw,
  )


def _toy_torch(x, t):
  """A fixed 'model': linear in x and t, the same function as `_toy_jax`."""
  return 0.7 * x - 0.2 * torch.tanh(x) + 3e-4 * float(t)


def _toy_jax(x, t):
  return 0.7 * x - 0.2 * jnp.tanh(x) + 3e-4 * t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


@needs_diffusers
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 100])
def test_schedules_equal_diffusers(kind, T):
  ref = _scheduler(diffusers.DDPMScheduler, kind, T=T)
  ours = df.make_schedule(kind, T)
  assert ours.num_train_steps == T and ours.betas.dtype == jnp.float32
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


@needs_diffusers
def test_q_sample_equals_add_noise_and_v_target_equals_get_velocity():
  ref = _scheduler(diffusers.DDPMScheduler, "scaled_linear")
  schedule = df.make_schedule()
  x0, noise = _randn(0), _randn(1)
  t = np.array([0, 517, 999], np.int64)
  expect = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(df.q_sample(schedule, x0, t, noise), expect, **TOL)
  velocity = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(df.prediction_target(schedule, x0, t, noise, "v"), velocity, **TOL)
  np.testing.assert_array_equal(df.prediction_target(schedule, x0, t, noise, "epsilon"), noise)
  np.testing.assert_array_equal(df.prediction_target(schedule, x0, t, noise, "sample"), x0)


@needs_diffusers
@pytest.mark.parametrize(
  "kind, prediction, clip, num_steps",
  [
    ("scaled_linear", "epsilon", None, 1000),
    ("scaled_linear", "epsilon", 1.0, 20),
    ("linear", "v", None, 50),
    ("cosine", "sample", 1.0, 7),
  ],
)
def test_ddpm_single_steps_equal_diffusers(kind, prediction, clip, num_steps):
  ref = _scheduler(diffusers.DDPMScheduler, kind, prediction, clip)
  ref.set_timesteps(num_steps)
  schedule = df.make_schedule(kind)
  ts = ref.timesteps.numpy()
  prev = df.previous_timesteps(df.timesteps(schedule, num_steps), 1000, "ddpm")
  x, out = _randn(2), _randn(3)
  for i in [0, 1, len(ts) // 2, len(ts) - 2, len(ts) - 1]:
    t = int(ts[i])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
    expect = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(i))
    got = df.ddpm_step(schedule, out, x, t, prev[i], None, prediction, clip, noise=noise.numpy())
    np.testing.assert_allclose(got, expect.prev_sample.numpy(), **TOL, err_msg=f"t={t}")


@needs_diffusers
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize(
  "kind, prediction, clip, spacing",
  [
    ("scaled_linear", "epsilon", None, "leading"),
    ("linear", "v", 1.0, "trailing"),
    ("cosine", "sample", None, "linspace"),
  ],
)
def test_ddim_single_steps_equal_diffusers(eta, kind, prediction, clip, spacing):
  ref = _scheduler(diffusers.DDIMScheduler, kind, prediction, clip, timestep_spacing=spacing)
  ref.set_timesteps(50)
  schedule = df.make_schedule(kind)
  ts = df.timesteps(schedule, 50, spacing)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  prev = df.previous_timesteps(ts, 1000, "ddim")
  x, out, noise = _randn(4), _randn(5), _randn(6)
  for i in [0, 25, 49]:
    t = int(ts[i])
    kw = {"variance_noise": torch.from_numpy(noise)} if eta else {}
    expect = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta, **kw).prev_sample.numpy()
    got = df.ddim_step(schedule, out, x, t, prev[i], None, eta, prediction, clip, noise=noise)
    np.testing.assert_allclose(got, expect, **TOL, err_msg=f"t={t}")


@needs_diffusers
def test_ddim_without_set_alpha_to_one_uses_alphas_cumprod_0_at_the_end():
  ref = _scheduler(diffusers.DDIMScheduler, set_alpha_to_one=False)
  ref.set_timesteps(10)
  schedule = df.make_schedule()
  x, out = _randn(7), _randn(8)
  expect = ref.step(torch.from_numpy(out), 0, torch.from_numpy(x)).prev_sample.numpy()
  np.testing.assert_allclose(df.ddim_step(schedule, out, x, 0, -100, None, set_alpha_to_one=False), expect, **TOL)


@needs_diffusers
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 3, 50, 999])
def test_timesteps_equal_set_timesteps(spacing, num_steps, steps_offset):
  ref = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
  ref.set_timesteps(num_steps)
  np.testing.assert_array_equal(df.timesteps(1000, num_steps, spacing, steps_offset), ref.timesteps.numpy())


def _diffusers_loop(ref, num_steps, x, noises, **step_kw):
  ref.set_timesteps(num_steps)
  x = torch.from_numpy(x)
  for i, t in enumerate(ref.timesteps):
    out = _toy_torch(x, t)
    kw = dict(step_kw)
    if noises is not None:
      kw["variance_noise"] = torch.from_numpy(noises[i])
    x = ref.step(out, t, x, **kw).prev_sample
  return x.numpy()


@needs_diffusers
@pytest.mark.parametrize(
  "sampler, prediction, eta, num_steps",
  [("ddim", "epsilon", 0.0, 50), ("ddim", "v", 0.5, 20), ("ddpm", "epsilon", None, 25), ("ddpm", "v", None, 10)],
)
def test_sample_loop_equals_diffusers_loop(sampler, prediction, eta, num_steps):
  cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
  ref = _scheduler(cls, "scaled_linear", prediction, steps_offset=1)
  x_T = _randn(9)
  if sampler == "ddim":
    noises = _randn(10, (num_steps, *SHAPE)) if eta else None
    expect = _diffusers_loop(ref, num_steps, x_T, noises, eta=eta)
  else:
    # DDPMScheduler draws its noise from the generator at every step with t > 0; draw the same.
    ref.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(0)
    noises = np.stack([torch.randn(SHAPE, generator=g).numpy() if t > 0 else np.zeros(SHAPE, np.float32)
                       for t in ref.timesteps])  # fmt: skip
    expect = _diffusers_loop(ref, num_steps, x_T, None, generator=torch.Generator().manual_seed(0))
  got = jax.jit(
    functools.partial(
      df.sample, _toy_jax, sampler=sampler, num_steps=num_steps, eta=eta or 0.0, prediction=prediction, steps_offset=1
    )
  )(df.make_schedule(), x_T, jax.random.key(0), noise=noises)
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_single_steps_equal_the_formulas_by_hand(prediction):
  # Without PyTorch the parity tests above skip: these hold each step to its formula in float64, from a
  # model output consistent with a known x0 and noise, for each prediction kind.
  schedule = df.make_schedule()
  a = np.asarray(schedule.alphas_cumprod, np.float64)
  x0, eps, noise = (_randn(s).astype(np.float64) for s in (20, 21, 22))
  t, t_prev = 500, 460
  sa, sb, ap = np.sqrt(a[t]), np.sqrt(1.0 - a[t]), a[t_prev]
  x_t = sa * x0 + sb * eps
  out = {"epsilon": eps, "sample": x0, "v": sa * eps - sb * x0}[prediction]
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  step_args = (schedule, f32(out), f32(x_t), jnp.asarray(t), jnp.asarray(t_prev), None)
  # DDIM (Song et al. eq. 12): sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise,
  # sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))
  for eta in (0.0, 0.5, 1.0):
    sigma = eta * np.sqrt((1.0 - ap) / (1.0 - a[t]) * (1.0 - a[t] / ap))
    expect = np.sqrt(ap) * x0 + np.sqrt(1.0 - ap - sigma**2) * eps + sigma * noise
    got = df.ddim_step(*step_args, eta=eta, prediction=prediction, noise=f32(noise))
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4, err_msg=f"ddim eta={eta}")
  # DDPM: the mean and "fixed_small" variance of the posterior q(x_prev | x_t, x0)
  beta = 1.0 - a[t] / ap
  mean = np.sqrt(ap) * beta / (1.0 - a[t]) * x0 + np.sqrt(1.0 - beta) * (1.0 - ap) / (1.0 - a[t]) * x_t
  expect = mean + np.sqrt((1.0 - ap) / (1.0 - a[t]) * beta) * noise
  got = df.ddpm_step(*step_args, prediction=prediction, noise=f32(noise))
  np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4, err_msg="ddpm")
  # the last DDPM step (t = 0 to the end) adds no noise and returns the predicted x0
  a0 = a[0]
  x_0 = np.sqrt(a0) * x0 + np.sqrt(1.0 - a0) * eps
  out0 = {"epsilon": eps, "sample": x0, "v": np.sqrt(a0) * eps - np.sqrt(1.0 - a0) * x0}[prediction]
  got = df.ddpm_step(schedule, f32(out0), f32(x_0), jnp.asarray(0), jnp.asarray(-1), None, prediction, noise=f32(noise))
  np.testing.assert_allclose(got, x0, rtol=1e-4, atol=1e-4, err_msg="ddpm t=0")


def test_ddim_with_the_exact_denoiser_of_a_point_mass_returns_the_point():
  schedule = df.make_schedule()
  target = jnp.asarray(_randn(11, (1, 4, 4, 2)))

  def optimal_eps(x, t):
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (x - jnp.sqrt(a) * target) / jnp.sqrt(1 - a)

  x_T = jax.random.normal(jax.random.key(1), (5, 4, 4, 2))
  for kw in [
    {"sampler": "ddim", "num_steps": 10},
    {"sampler": "ddim", "num_steps": 50, "eta": 1.0},
    {"sampler": "ddpm"},
  ]:
    got = df.sample(optimal_eps, schedule, x_T, jax.random.key(2), **kw)
    np.testing.assert_allclose(got, jnp.broadcast_to(target, x_T.shape), atol=1e-4, err_msg=str(kw))


def test_sample_compiles_once_for_repeated_calls():
  schedule = df.make_schedule()

  def apply_fn(w, x, t):
    return w * x + 1e-4 * t[:, None]

  run = jax.jit(lambda w, x, rng: df.sample(functools.partial(apply_fn, w), schedule, x, rng, num_steps=5, eta=0.3))
  a = run(0.5, jnp.ones((2, 3)), jax.random.key(0))
  b = run(0.6, jnp.zeros((2, 3)), jax.random.key(1))
  assert run._cache_size() == 1
  assert not np.allclose(a, b)


def test_guidance():
  x, t = jnp.asarray(_randn(12, (4, 3))), jnp.array([5, 6, 7, 8])
  cond = {"ctx": jnp.asarray(_randn(13, (4, 2))), "mask": jnp.ones((4, 2), bool)}
  null = {"ctx": jnp.zeros((1, 2)), "mask": jnp.zeros((1, 2), bool)}
  calls = []

  def apply_fn(x, t, c):
    calls.append(x.shape[0])
    return x * jnp.sum(c["ctx"] * c["mask"], -1, keepdims=True) + t[:, None]

  np.testing.assert_allclose(df.guided_model_fn(apply_fn, cond, null, 1.0)(x, t), apply_fn(x, t, cond))
  assert calls == [4, 4]
  calls.clear()
  s = 3.5
  got = df.guided_model_fn(apply_fn, cond, null, s)(x, t)
  assert calls == [8]  # one batched call for both halves
  null_b = jax.tree.map(lambda n: jnp.broadcast_to(n, (4, 2)), null)
  uncond, conditional = apply_fn(x, t, null_b), apply_fn(x, t, cond)
  np.testing.assert_allclose(got, uncond + s * (conditional - uncond), rtol=1e-6)


def test_loss_is_the_mse_to_the_target_and_falls_for_a_fitted_model():
  schedule = df.make_schedule("linear", 100, 1e-4, 0.02)
  x0 = jnp.asarray(_randn(14, (64, 2)))
  loss_zero, aux = df.diffusion_loss(lambda x, t: jnp.zeros_like(x), schedule, x0, jax.random.key(0))
  assert aux["loss"] == loss_zero
  np.testing.assert_allclose(loss_zero, 1.0, atol=0.2)  # E[eps^2] = 1
  # The optimal x0 predictor returns x0 exactly: zero loss with prediction="sample".
  loss_x0, _ = df.diffusion_loss(lambda x, t: x0, schedule, x0, jax.random.key(0), prediction="sample")
  assert float(loss_x0) == 0.0


def test_drop_condition():
  mask = jnp.ones((1000, 3), bool)
  dropped = df.drop_condition(jax.random.key(0), mask, 0.25)
  rows = np.asarray(dropped.all(-1))
  assert np.all(dropped.any(-1) == dropped.all(-1))  # whole examples dropped
  assert 0.2 < 1 - rows.mean() < 0.3


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="noise schedule"):
    df.make_schedule("quadratic")
  with pytest.raises(ValueError, match="prediction"):
    df.prediction_target(df.make_schedule(), jnp.zeros(2), jnp.zeros(2, int), jnp.zeros(2), "eps")
  with pytest.raises(ValueError, match="num_steps"):
    df.timesteps(1000, 1001)
  with pytest.raises(ValueError, match="sampler"):
    df.sample(_toy_jax, df.make_schedule(), jnp.zeros((1, 2)), jax.random.key(0), sampler="euler")
