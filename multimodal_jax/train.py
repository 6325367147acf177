"""The model-agnostic trainer: sharded train state, the jitted train step, and its pieces.

An experiment supplies `loss_fn(params, batch, rng) -> (loss, aux)`, a function that creates
(logically annotated) params, and an optax optimizer; this module turns them into a train state
created directly in its sharded layout and a train step jitted once over a device `Mesh`.
The loop that drives them lives in `loop.py`.

Gradient accumulation (`grad_accum_steps=k`) has two meanings, chosen by the type of `loss_fn`:

- a plain function: the mean over k microbatches of each microbatch's loss and gradient. For a
  loss that is a mean of per-example terms this is the full batch's gradient.
- an `EmbeddingLoss` (a loss whose examples meet only through per-example embeddings, such as a
  contrastive loss, where every example is every other's negative): the gradient of the loss of
  the whole batch, computed with one microbatch's activations alive at a time (`make_grad_fn`).
  The mean over microbatches would be another, weaker objective: each microbatch's negatives only.
"""

from __future__ import annotations

import dataclasses
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
GradFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any, Any]]


@dataclasses.dataclass(frozen=True)
class EmbeddingLoss:
  """A loss of a whole batch whose examples meet only through per-example embeddings, in two parts:

  - `embed(params, batch, rng) -> embeddings`: a tree whose every leaf has the batch as its leading
    axis, row i computed from example i alone (e.g. CLIP's image and text embeddings `[b, d]`);
  - `loss_from_embeddings(params, embeddings) -> (loss, aux)`: the batch's loss from them; `params`
    give what the loss itself owns (e.g. CLIP's logit scale and bias).

  Called, it is the plain `LossFn` `loss_from_embeddings(params, embed(params, batch, rng))`, so it
  goes wherever a loss function goes. The split is what lets the trainer accumulate the gradient of
  the whole batch's loss over microbatches (`make_grad_fn`) without holding every microbatch's
  activations; the trainer needs to know nothing else about the model.
  """

  embed: Callable[[Any, Any, jax.Array], Any]
  loss_from_embeddings: Callable[[Any, Any], tuple[jax.Array, Any]]

  def __call__(self, params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Any]:
    return self.loss_from_embeddings(params, self.embed(params, batch, rng))


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


def _merge_microbatches(micro: Any) -> Any:
  """The inverse of `_split_microbatches`: [num, B / num, ...] -> [B, ...] in the batch's own order."""

  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

  return jax.tree.map(merge, micro)


def make_grad_fn(
  loss_fn: LossFn | EmbeddingLoss,
  mesh: Mesh,
  *,
  grad_accum_steps: int = 1,
  compute_dtype: Any = jnp.float32,
) -> GradFn:
  """`grad_fn(params, global_batch, rng) -> (loss, aux, grads)`, the gradient part of the train step
  (trace it inside a jit; `make_train_step` does). Loss and grads are float32.

  - `loss_fn` sees params cast to `compute_dtype` (params stay float32; their gradients come back
    float32 through the cast). Float batch leaves are cast too.
  - `grad_accum_steps = k > 1` splits the batch into k microbatches of strided rows (microbatch i
    holds rows i, i + k, ...: each stays spread evenly over the data-parallel devices); microbatch
    i draws its randomness from `fold_in(rng, i)` (with k = 1 the batch gets `rng` itself).
  - A plain `loss_fn`, k > 1: loss, aux and gradients are the means over the microbatches (one
    `lax.scan`, constant memory in k).
  - An `EmbeddingLoss`, k > 1: the loss, aux and gradient of the whole batch, in three passes:
    (1) a `lax.scan` embeds each microbatch (forward only: no activations are kept) into the
    whole batch's embeddings; (2) `loss_from_embeddings` of the whole batch and its gradient with
    respect to the embeddings and params; (3) a second `lax.scan` runs each microbatch's `embed`
    again under `jax.vjp` with the same rng and pulls its rows of the embedding gradient back to
    the params, summing. The cost is one extra forward pass per step; the memory is one
    microbatch's activations, the whole batch's embeddings and what the loss of them needs.
  """
  batch_sharding = shd.batch_sharding(mesh)
  k = grad_accum_steps

  def cast(tree):
    return cast_floating(tree, compute_dtype)

  def rows(tree):
    """`tree`'s leaves constrained to the batch split (leading axis over the data axes)."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim)), tree)

  def value_and_grad(params, batch, rng):
    def compute(p, b):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for sharding.constrain in model code
        loss, aux = loss_fn(cast(p), cast(b), rng)
      return loss.astype(jnp.float32), aux

    (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(params, batch)
    return loss, aux, grads

  def mean_of_microbatches(params, batch, rng):
    micro = _split_microbatches(batch, k)

    def body(carry, xs):
      index, mb = xs
      mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
      return jax.tree.map(jnp.add, carry, value_and_grad(params, mb, jax.random.fold_in(rng, index))), None

    first = jax.eval_shape(value_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, total)

  def whole_batch(params, batch, rng):
    micro = _split_microbatches(batch, k)
    indices = jnp.arange(k)

    size = jax.tree.leaves(micro)[0].shape[1]

    def embed(p, mb, index):
      mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        embeddings = loss_fn.embed(cast(p), cast(mb), jax.random.fold_in(rng, index))
      if any(x.ndim < 1 or x.shape[0] != size for x in jax.tree.leaves(embeddings)):
        shapes = jax.tree.map(jnp.shape, embeddings)
        raise ValueError(f"EmbeddingLoss.embed must give a row per example ({size}) on every leaf; it gave {shapes}")
      return rows(embeddings)

    # (1) Forward only: nothing differentiates this scan, so no microbatch's activations outlive it.
    _, embedded = jax.lax.scan(lambda _, xs: (None, embed(params, xs[1], xs[0])), None, (indices, micro))
    embeddings = rows(_merge_microbatches(embedded))

    # (2) The whole batch's loss, and its gradient w.r.t. the embeddings and the loss's own params.
    def from_embeddings(p, e):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        loss, aux = loss_fn.loss_from_embeddings(cast(p), e)
      return loss.astype(jnp.float32), aux

    (loss, aux), (grads, d_embeddings) = jax.value_and_grad(from_embeddings, argnums=(0, 1), has_aux=True)(
      params, embeddings
    )

    # (3) Each microbatch again, same rng, under vjp: its rows of d_embeddings become param gradients.
    def backward(grads, xs):
      index, mb, d_rows = xs
      _, pull_back = jax.vjp(lambda p: embed(p, mb, index), params)
      return jax.tree.map(jnp.add, grads, pull_back(rows(d_rows))[0]), None

    grads, _ = jax.lax.scan(backward, grads, (indices, micro, _split_microbatches(d_embeddings, k)))
    return loss, aux, grads

  if k == 1:
    return value_and_grad
  return whole_batch if isinstance(loss_fn, EmbeddingLoss) else mean_of_microbatches


def make_train_step(
  loss_fn: LossFn | EmbeddingLoss,
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
  - Loss and gradients come from `make_grad_fn(loss_fn, mesh, grad_accum_steps, compute_dtype)`:
    `loss_fn` sees params and float batch leaves cast to `compute_dtype`; with
    `grad_accum_steps > 1` a plain `loss_fn` is averaged over microbatches, an `EmbeddingLoss`
    gives the whole batch's loss and gradient (see `make_grad_fn`). The logged `loss` is that one.
  - A non-finite loss or gradient skips the update (state unchanged but for the step) and
    reports `finite = False`, so the caller can stop with the last good state intact.
  """
  base_key = jax.random.key(seed)
  batch_sharding = shd.batch_sharding(mesh)
  grad_fn = make_grad_fn(loss_fn, mesh, grad_accum_steps=grad_accum_steps, compute_dtype=compute_dtype)

  def step_fn(state: TrainState, batch: Any):
    rng = jax.random.fold_in(base_key, state.step)
    loss, aux, grads = grad_fn(state.params, batch, rng)
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
