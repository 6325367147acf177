"""The model-agnostic trainer: sharded train state, the jitted train step, and its pieces.

An experiment supplies `loss_fn(params, batch, rng) -> (loss, aux)`, a function that creates
(logically annotated) params, and an optax optimizer; this module turns them into a train state
created directly in its sharded layout and a train step jitted once over a device `Mesh`.
The loop that drives them lives in `loop.py`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from multimodal_jax import sharding as shd
from multimodal_jax import trees

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. `ema_params` is None when EMA is off. `model_state` is
  the model's state that gradients do not train (flax's `batch_stats` pattern, e.g. population
  batch-norm statistics): None when the model has none; the step passes it through unchanged and
  the loop refreshes it from the saved params before each checkpoint (`loop.fit(model_state_fn=)`)."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  model_state: Any = None


def _boxed_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, ema: bool, rng):
  params = init_params(rng)  # may hold nn.Partitioned boxes with logical axis names
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),  # optax maps over the boxes, so moments keep the names
    ema_params=params if ema else None,
  )


def abstract_train_state(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  mesh: Mesh,
  ema: bool = False,
) -> tuple[Any, Any]:
  """Shapes and shardings of the train state, without allocating it.

  Returns `(abstract_state, shardings)`: a TrainState of `jax.ShapeDtypeStruct`s that carry their
  shardings (the orbax restore target) and the matching tree of NamedShardings.
  """
  boxed = jax.eval_shape(functools.partial(_boxed_state, init_params, tx, ema), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  unboxed = nn.meta.unbox(boxed)
  shardings = shd.tree_shardings(unboxed, specs, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
  return abstract, shardings


def abstract_params(init_params: Callable[[jax.Array], Any], mesh: Mesh) -> Any:
  """The params' `jax.ShapeDtypeStruct`s with their shardings on `mesh` (a restore target),
  without allocating them or building an optimizer."""
  boxed = jax.eval_shape(init_params, jax.random.key(0))
  unboxed = nn.meta.unbox(boxed)
  shardings = shd.tree_shardings(unboxed, nn.get_partition_spec(boxed), mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)


def abstract_model_state(model_state_fn: Callable[[Any], Any], abstract_params: Any, mesh: Mesh) -> tuple[Any, Any]:
  """`(abstract, shardings)` of `model_state_fn(params)`: its `jax.ShapeDtypeStruct`s (computed
  without running it) and replicated shardings on `mesh` (model state is small)."""
  shapes = jax.eval_shape(model_state_fn, abstract_params)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, shapes)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
  return abstract, shardings


def init_train_state(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  shardings: Any,
  rng: jax.Array,
  ema: bool = False,
) -> TrainState:
  """The train state, created by one jitted init straight into its sharded layout."""

  def init(rng):
    return nn.meta.unbox(_boxed_state(init_params, tx, ema, rng))

  return jax.jit(init, out_shardings=shardings)(rng)


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts the floating-point leaves of a tree (params or a batch) to `dtype`."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _split_microbatches(batch: Any, num: int) -> Any:
  """[B, ...] -> [num, B / num, ...] taking rows i, i + num, ... for microbatch i.

  Strided rows keep every microbatch spread over all data-parallel devices.
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={num}")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  state_shardings: Any,
  *,
  seed: int = 0,
  grad_accum_steps: int = 1,
  compute_dtype: Any = jnp.float32,
  ema_decay: float | None = None,
  learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """The jitted, donated train step `(state, global_batch) -> (state, metrics)`.

  - The step's randomness is `fold_in(key(seed), step)`: a resumed run draws the same numbers.
  - `loss_fn` sees params cast to `compute_dtype` (params stay float32; their gradients come
    back float32 through the cast). Float batch leaves are cast too.
  - With `grad_accum_steps > 1` the batch is split into microbatches whose gradients are
    averaged in a `lax.scan` (constant memory in the number of microbatches).
  - A non-finite loss or gradient skips the update (state unchanged but for the step) and
    reports `finite = False`, so the caller can stop with the last good state intact.
  """
  base_key = jax.random.key(seed)
  batch_sharding = shd.batch_sharding(mesh)

  def grads_of(params, batch, rng):
    def compute(p, b):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for sharding.constrain in model code
        loss, aux = loss_fn(cast_floating(p, compute_dtype), cast_floating(b, compute_dtype), rng)
      return loss.astype(jnp.float32), aux

    return jax.value_and_grad(compute, has_aux=True)(params, batch)

  def step_fn(state: TrainState, batch: Any):
    rng = jax.random.fold_in(base_key, state.step)
    if grad_accum_steps == 1:
      (loss, aux), grads = grads_of(state.params, batch, rng)
    else:
      micro = _split_microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        index, mb = xs
        mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
        (l, a), g = grads_of(state.params, mb, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      (l0, a0), g0 = jax.eval_shape(grads_of, state.params, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, aux, grads))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: e * ema_decay + (1.0 - ema_decay) * p, ema, params)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
      "finite": finite,
      **aux,
    }
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def make_optimizer(
  config: Any, freeze_aliases: dict[str, str] | None = None
) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warmup and cosine decay, global-norm clipping: from config keys
  `learning_rate`, `warmup_steps`, `steps`, `weight_decay`, `grad_clip` (0 disables) and, when the
  config has them, `weight_decay_mask` and `freeze`.

  - `weight_decay_mask="default"` decays weight matrices, convolution kernels and token embedding
    tables only (`decays`): not biases, norm scales, position tables or logit scale/bias, as
    open_clip and big_vision do; `"all"` decays every parameter.
  - `freeze=REGEX` (or a name in `freeze_aliases`, e.g. CLIP's `image` / `text`) freezes every
    parameter whose '/'-joined path matches: it gets a zero update and no optimizer moments (its
    leaves are masked out of AdamW's state), so a locked tower costs no Adam memory (LiT).
  """
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=min(config.warmup_steps, max(config.steps - 1, 0)),
    decay_steps=max(config.steps, 1),
    end_value=config.learning_rate * 0.01,
  )
  mask = config.get("weight_decay_mask", "default")
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  decay_mask = (lambda params: _map_paths(decays, params)) if mask == "default" else None
  parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  freeze = config.get("freeze", "")
  if freeze:
    pattern = re.compile((freeze_aliases or {}).get(freeze, freeze))

    def labels(params):
      return _map_paths(lambda path: "frozen" if pattern.search(path) else "trained", params)

    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def decays(path: str) -> bool:
  """Whether weight decay applies to the parameter at '/'-joined `path`: kernels and token
  embedding tables, not biases, scales, position tables, class/null tokens or logit scale/bias."""
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":
    return True
  return "embedding" in name and "position" not in name and name != "class_embedding"


def param_paths(params: Any) -> list[str]:
  """The '/'-joined path of every parameter (boxes with logical names are looked through)."""
  return jax.tree.leaves(_map_paths(lambda path: path, params))


def _map_paths(fn: Callable[[str], Any], params: Any) -> Any:
  """`fn(path)` at every parameter of `params` (a tree that may hold nn.Partitioned boxes: a box is
  one parameter), the path '/'-joined by `trees.path_name`."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(trees.path_name(path, "/")), params, is_leaf=is_box)
