"""Small array functions shared across the library: a function applied over fixed-size row chunks,
L2 normalization, random translation of images. Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """`a [n, ...]` with its last row repeated up to `size` rows (`a` itself when it has `size` or more)."""
  a = np.asarray(a)
  return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a


def batched_apply(fn: Callable[[Any], Any], tree: Any, batch_size: int, *, shrink: bool = True) -> Any:
  """`fn` over consecutive chunks of `batch_size` rows of `tree` (a pytree of arrays `[n, ...]`), each
  chunk padded to `batch_size` rows by repeating its last row, so that a jitted `fn` compiles one shape;
  the outputs (a pytree of arrays `[batch_size, ...]`) are cut back to the real rows and concatenated
  on the host. `shrink=True` lowers the chunk size to `n` when `n < batch_size` (one smaller program
  for a small input); `shrink=False` always pads to `batch_size` (the same program for every call).

  Padding by repetition keeps the padded rows valid inputs, so `fn` must compute each output row from
  its own input row only (as any per-example model does).
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("batched_apply needs at least one array")
  n = len(leaves[0])
  if any(len(leaf) != n for leaf in leaves):
    raise ValueError(f"batched_apply takes arrays of equal length, got {[len(leaf) for leaf in leaves]}")
  if n == 0:
    raise ValueError("batched_apply needs at least one row")
  size = min(batch_size, n) if shrink else batch_size
  outs = [_apply_chunk(fn, tree, start, min(size, n - start), size) for start in range(0, n, size)]
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def _apply_chunk(fn, tree, start: int, count: int, size: int):
  chunk = jax.tree.map(lambda a: pad_rows(np.asarray(a)[start : start + count], size), tree)
  return jax.tree.map(lambda o: np.asarray(o)[:count], jax.device_get(fn(chunk)))


def l2_normalize(x, eps: float = 1e-12):
  """`x [..., d]` / max(||x||, eps) along the last axis, computed in float32 and returned in `x`'s dtype.
  A numpy array stays numpy (computed on the host); anything else (a jax array, a tracer) goes through jnp."""
  xp = np if isinstance(x, np.ndarray) else jnp
  x32 = x.astype(xp.float32)
  norm = xp.sqrt(xp.sum(x32 * x32, axis=-1, keepdims=True))
  return (x32 / xp.maximum(norm, eps)).astype(x.dtype)


def random_shift(images: jnp.ndarray, rng: jax.Array, max_shift: int, fill: float) -> jnp.ndarray:
  """Translates each image of `[b, h, w, c]` by up to `max_shift` pixels in each direction, the
  uncovered border set to `fill` (the value of a background pixel)."""
  if not max_shift:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=fill)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def floating_dtype(tree: Any) -> jnp.dtype:
  """The dtype of `tree`'s first floating leaf (for params: the step's compute dtype, see
  `train.make_grad_fn`), float32 when it has none. Inputs a loss function makes itself (normalized
  pixels, scaled features) are cast to it: made in float32 they would promote a bfloat16 step's
  activations and matmuls to float32."""
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return jnp.result_type(leaf)
  return jnp.dtype(jnp.float32)
