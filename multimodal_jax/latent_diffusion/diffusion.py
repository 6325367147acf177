"""Gaussian diffusion: noise schedules, q_sample, the training loss, DDPM / DDIM steps, samplers as one
`lax.scan`, and classifier-free guidance.

Conventions follow diffusers' DDPMScheduler / DDIMScheduler (variance "fixed_small", `steps_offset`,
`set_alpha_to_one`, the "leading" / "trailing" / "linspace" timestep spacings), so the same numbers
come out. Timesteps are integers in `[0, T)`; a previous timestep below 0 means "past the end" and
uses `final_alpha_cumprod` (1 unless `set_alpha_to_one=False`, then `alphas_cumprod[0]`; DDPM always
uses 1, as diffusers does). Samples are any shape `[batch, ...]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTIONS = ("epsilon", "v", "sample")
SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@struct.dataclass
class Schedule:
  """A discrete noise schedule: `betas` and `alphas_cumprod` (prod of 1 - beta), float32 `[T]`."""

  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_train_steps(self) -> int:
    return self.betas.shape[0]


def _cosine_betas(num_train_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """GLIDE / improved-DDPM cosine schedule (diffusers' "squaredcos_cap_v2")."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_steps
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def make_schedule(
  kind: str = "scaled_linear", num_train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Schedule:
  """The schedule `kind`: "linear" (betas linear in [beta_start, beta_end]), "scaled_linear" (square
  roots linear, Stable Diffusion's) or "cosine" (`beta_start` / `beta_end` unused). float32, as diffusers."""
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float32)
  elif kind == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=np.float32) ** 2
  elif kind == "cosine":
    betas = _cosine_betas(num_train_steps).astype(np.float32)
  else:
    raise ValueError(f"noise schedule {kind!r}: choose one of {SCHEDULES}")
  alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
  return Schedule(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod))


def _check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction {prediction!r}: choose one of {PREDICTIONS}")


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """A scalar or `[batch]` array as float32, shaped to broadcast against `like [batch, ...]`."""
  values = jnp.asarray(values, jnp.float32)
  if values.ndim:
    values = values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
  return values


def _alpha_at(schedule: Schedule, t: jax.Array, final: jax.Array | float = 1.0) -> jax.Array:
  """`alphas_cumprod[t]`, or `final` where `t < 0`."""
  t = jnp.asarray(t)
  safe = jnp.clip(t, 0, schedule.num_train_steps - 1)
  return jnp.where(t >= 0, schedule.alphas_cumprod[safe], jnp.asarray(final, jnp.float32))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """A draw of `q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I)` from the given noise; `t` int `[batch]`."""
  a = _per_example(schedule.alphas_cumprod[t], x0)
  return (jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)).astype(x0.dtype)


def prediction_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
  """What the model should output at `(x_t, t)`: the noise ("epsilon"), the velocity
  `sqrt(a_t) eps - sqrt(1 - a_t) x_0` ("v", diffusers' v_prediction) or `x_0` ("sample")."""
  _check_prediction(prediction)
  if prediction == "epsilon":
    return noise
  if prediction == "sample":
    return x0
  a = _per_example(schedule.alphas_cumprod[t], x0)
  return (jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)).astype(x0.dtype)


def diffusion_loss(
  model_fn: ModelFn, schedule: Schedule, x0: jax.Array, rng: jax.Array, prediction: str = "epsilon"
) -> tuple[jax.Array, dict]:
  """`(loss, {"loss": loss})`: the mean squared error between `model_fn(x_t, t)` and the target, with
  `t ~ U{0..T-1}` per example and `x_t = q_sample(x0, t, eps)`, `eps ~ N(0, I)`. float32 loss."""
  _check_prediction(prediction)
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_train_steps)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32).astype(x0.dtype)
  out = model_fn(q_sample(schedule, x0, t, noise), t)
  target = prediction_target(schedule, x0, t, noise, prediction)
  loss = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))
  return loss, {"loss": loss}


def drop_condition(rng: jax.Array, context_mask: jax.Array, p: float) -> jax.Array:
  """Classifier-free guidance training: `context_mask [batch, ...]` with each example's mask set
  all False ("no condition") with probability `p`."""
  keep = jax.random.uniform(rng, (context_mask.shape[0],)) >= p
  return context_mask & keep.reshape((-1,) + (1,) * (context_mask.ndim - 1))


def _x0_and_eps(model_out, x_t, a_t, prediction):
  """The predicted `x_0` and noise from a model output of kind `prediction` at `x_t` (alpha_cumprod `a_t`)."""
  _check_prediction(prediction)
  sa, sb = jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t)
  if prediction == "epsilon":
    return (x_t - sb * model_out) / sa, model_out
  if prediction == "sample":
    return model_out, (x_t - sa * model_out) / sb
  return sa * x_t - sb * model_out, sa * model_out + sb * x_t


def _noise(rng, noise, like):
  return jax.random.normal(rng, like.shape, jnp.float32) if noise is None else jnp.asarray(noise, jnp.float32)


def ddpm_step(
  schedule: Schedule,
  model_out: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  rng: jax.Array | None,
  prediction: str = "epsilon",
  clip_sample: float | None = None,
  *,
  noise: jax.Array | None = None,
) -> jax.Array:
  """One ancestral step `x_t -> x_{t_prev}` from the posterior `q(x_{t_prev} | x_t, x_0-hat)` with
  variance "fixed_small"; `t_prev` may be any earlier step (respaced DDPM), or < 0 at the end.

  `t`, `t_prev`: scalars or int `[batch]`. No noise is added where `t == 0`. `clip_sample`: clamp
  the predicted `x_0` to `[-c, c]` (None: no clamp). `noise` replaces the draw from `rng` (e.g.
  diffusers' variance noise).
  """
  x = x_t.astype(jnp.float32)
  out = model_out.astype(jnp.float32)
  a_t = _per_example(_alpha_at(schedule, t), x)
  a_prev = _per_example(_alpha_at(schedule, t_prev), x)
  x0, _ = _x0_and_eps(out, x, a_t, prediction)
  if clip_sample is not None:
    x0 = jnp.clip(x0, -clip_sample, clip_sample)
  alpha_t = a_t / a_prev  # the strided step's alpha
  beta_t = 1.0 - alpha_t
  mean = (jnp.sqrt(a_prev) * beta_t / (1.0 - a_t)) * x0 + (jnp.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t)) * x
  variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
  std = jnp.where(_per_example(jnp.asarray(t) > 0, x), jnp.sqrt(variance), 0.0)
  return (mean + std * _noise(rng, noise, x)).astype(x_t.dtype)


def ddim_step(
  schedule: Schedule,
  model_out: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  rng: jax.Array | None,
  eta: float = 0.0,
  prediction: str = "epsilon",
  clip_sample: float | None = None,
  *,
  noise: jax.Array | None = None,
  set_alpha_to_one: bool = True,
) -> jax.Array:
  """One DDIM step `x_t -> x_{t_prev}` (Song et al. eq. 12) with `sigma_t = eta * sqrt(var_t)`:
  eta 0 is deterministic, eta 1 has DDPM's variance. As diffusers' DDIMScheduler.step (the noise
  direction uses the unclipped model output). Other arguments as `ddpm_step`."""
  x = x_t.astype(jnp.float32)
  out = model_out.astype(jnp.float32)
  final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
  a_t = _per_example(_alpha_at(schedule, t), x)
  a_prev = _per_example(_alpha_at(schedule, t_prev, final), x)
  x0, eps = _x0_and_eps(out, x, a_t, prediction)
  if clip_sample is not None:
    x0 = jnp.clip(x0, -clip_sample, clip_sample)
  deterministic = isinstance(eta, (int, float)) and eta == 0
  if deterministic:
    return (jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps).astype(x_t.dtype)
  variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * jnp.sqrt(variance)
  x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps
  return (x_prev + std * _noise(rng, noise, x)).astype(x_t.dtype)


def timesteps(schedule: Schedule | int, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
  """The descending int32 timesteps of a `num_steps` sampler, as diffusers' `set_timesteps`.

  "leading": `[0, k, 2k, ...] + steps_offset` with `k = T // num_steps` (Stable Diffusion uses
  steps_offset 1); "trailing": `round(T, T - T/n, ...) - 1`; "linspace": `round(linspace(0, T - 1))`.
  `schedule` may be the number of training steps T; `steps_offset` applies to "leading" only.

  For every `1 <= num_steps <= T` and every spacing the result is exactly `num_steps` distinct steps
  in `[0, T)`, descending. "trailing" is computed as `T + i * delta`, the arithmetic of diffusers'
  float `arange(T, 0, -T/n)`, so the values are diffusers' wherever that returns n steps; where float
  rounding makes it return n + 1 (e.g. T=1000, n=61, ending in -1) only the first n are kept.
  Raises ValueError (one line) for `num_steps` outside `[1, T]`, an unknown spacing, or a
  `steps_offset` that puts a step outside `[0, T)`.
  """
  num_train = schedule if isinstance(schedule, int) else schedule.num_train_steps
  if not 1 <= num_steps <= num_train:
    raise ValueError(f"num_steps={num_steps}: must be between 1 and the schedule's {num_train} training steps")
  if spacing == "leading":
    ts = (np.arange(num_steps) * (num_train // num_steps))[::-1] + steps_offset
  elif spacing == "trailing":
    # numpy's float arange fills start + i * ((start + step) - start); the same sum, for n terms only.
    delta = (num_train - num_train / num_steps) - num_train
    ts = np.round(num_train + np.arange(num_steps) * delta) - 1
  elif spacing == "linspace":
    ts = np.linspace(0, num_train - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f"timestep spacing {spacing!r}: choose one of {SPACINGS}")
  if ts[0] >= num_train or ts[-1] < 0:
    raise ValueError(
      f"steps_offset={steps_offset} puts {spacing} timesteps at {int(ts[-1])}..{int(ts[0])}, outside the schedule's "
      f"0..{num_train - 1}: lower steps_offset or num_steps"
    )
  return np.ascontiguousarray(ts).astype(np.int32)


def previous_timesteps(ts: np.ndarray, num_train_steps: int, sampler: str) -> np.ndarray:
  """The step each of `ts` goes to: DDIM `t - T // n` (diffusers' rule, for every spacing), DDPM the
  next timestep in `ts` (and -1 after the last)."""
  if sampler == "ddim":
    return (ts - num_train_steps // len(ts)).astype(np.int32)
  if sampler == "ddpm":
    return np.append(ts[1:], -1).astype(np.int32)
  raise ValueError(f"sampler {sampler!r}: choose one of {SAMPLERS}")


def sample(
  model_fn: ModelFn,
  schedule: Schedule,
  x_T: jax.Array,
  rng: jax.Array,
  *,
  sampler: str = "ddim",
  num_steps: int = 50,
  eta: float = 0.0,
  prediction: str = "epsilon",
  clip_sample: float | None = None,
  spacing: str = "leading",
  steps_offset: int = 0,
  set_alpha_to_one: bool = True,
  noise: jax.Array | None = None,
) -> jax.Array:
  """`x_0` from `x_T` (e.g. standard normal `[batch, ...]`) by `num_steps` steps of `sampler`
  ("ddim" or "ddpm"), one `lax.scan`; `model_fn(x_t, t [batch]) -> model output`.

  Jit it with `sampler`, `num_steps`, `eta`, `prediction`, `clip_sample`, `spacing` static (e.g.
  `jax.jit(lambda params, x, rng: sample(partial(apply, params), schedule, x, rng, num_steps=50))`).
  Step i draws its noise from `fold_in(rng, i)`, or takes `noise[i]` when `noise [num_steps, *x_T.shape]`
  is given.
  """
  _check_prediction(prediction)
  ts = timesteps(schedule, num_steps, spacing, steps_offset)
  prev = previous_timesteps(ts, schedule.num_train_steps, sampler)
  batch = x_T.shape[0]
  stochastic = sampler == "ddpm" or not (isinstance(eta, (int, float)) and eta == 0)

  def body(x, xs):
    i, t, t_prev = xs[:3]
    step_noise = xs[3] if noise is not None else None
    out = model_fn(x, jnp.full((batch,), t, jnp.int32))
    key = jax.random.fold_in(rng, i) if stochastic and step_noise is None else None
    if sampler == "ddpm":
      x = ddpm_step(schedule, out, x, t, t_prev, key, prediction, clip_sample, noise=step_noise)
    else:
      x = ddim_step(
        schedule, out, x, t, t_prev, key, eta, prediction, clip_sample, noise=step_noise,
        set_alpha_to_one=set_alpha_to_one,
      )  # fmt: skip
    return x, None

  xs = (jnp.arange(num_steps), jnp.asarray(ts), jnp.asarray(prev))
  if noise is not None:
    xs = (*xs, noise)
  x, _ = jax.lax.scan(body, x_T, xs)
  return x


def guided_model_fn(
  apply_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
  cond: Any,
  null_cond: Any,
  guidance_scale: float | jax.Array,
) -> ModelFn:
  """Classifier-free guidance: `model_fn(x_t, t) = uncond + s * (cond - uncond)`.

  `apply_fn(x_t, t, c) -> output`; `cond` and `null_cond` are pytrees with the batch leading (a
  `null_cond` leaf with batch 1 is broadcast). Both run in ONE call on the doubled batch. A Python
  `guidance_scale` of 1 returns the conditional model alone (no unconditional half).
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
    return lambda x, t: apply_fn(x, t, cond)

  def model_fn(x, t):
    b = x.shape[0]
    both = jax.tree.map(
      lambda c, n: jnp.concatenate([c, jnp.broadcast_to(n, (b,) + n.shape[1:]).astype(c.dtype)]), cond, null_cond
    )
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    c_out, u_out = out[:b], out[b:]
    return u_out + guidance_scale * (c_out - u_out)

  return model_fn
