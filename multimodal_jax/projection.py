"""`projection_dot_general`: the contraction of nn.Dense / nn.DenseGeneral with a weight gradient
laid out for XLA:CPU (same values as `lax.dot_general`). Shared by attention and the MLP blocks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from multimodal_jax.sharding import current_platform


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jnp.ndarray, w: jnp.ndarray, c: int) -> jnp.ndarray:
  """Contracts the last `c` axes of `x [*batch, *k]` with the first `c` of `w [*k, *m]` -> `[*batch, *m]`.

  Same values as `lax.dot_general`; only the weight gradient differs in form: it transposes the
  narrower of `x` and the output gradient (XLA:CPU's dot kernels want the contracted axis
  innermost, so one operand is copied; JAX's own VJP always copies the output gradient, 3-4x the
  bytes of `x` for qkv and fc1).
  """
  return _project_fwd(x, w, c)[0]


def _contract(a, b, a_axes, b_axes):
  return jax.lax.dot_general(a, b, ((tuple(a_axes), tuple(b_axes)), ((), ())))


def _project_fwd(x, w, c):
  return _contract(x, w, range(x.ndim - c, x.ndim), range(c)), (x, w)


def _project_bwd(c, res, g):
  x, w = res
  nb, nm = x.ndim - c, w.ndim - c  # batch axes of x, output axes of w
  dx = _contract(g, w, range(nb, nb + nm), range(c, c + nm))  # [*batch, *k]
  if math.prod(x.shape[nb:]) <= math.prod(g.shape[nb:]):
    dw = _contract(x, g, range(nb), range(nb))  # [*k, *m]
  else:
    dw = jnp.transpose(_contract(g, x, range(nb), range(nb)), (*range(nm, nm + c), *range(nm)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def projection_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` for nn.Dense / nn.DenseGeneral through `_project` when it contracts the
  last axes of `lhs` with the first of `rhs` (no batch axes): same values, cheaper weight gradient on
  XLA:CPU. On GPU and TPU (the platform traced for, `sharding.current_platform`) it is plain
  `lax.dot_general`: there the compiler picks the layouts (docs/scale.md compares both plans)."""
  (lc, rc), (lb, rb) = dimension_numbers
  c = len(lc)
  if current_platform() != "cpu":  # the layout is XLA:CPU's concern; elsewhere the compiler's own VJP
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
  if lb or rb or tuple(lc) != tuple(range(lhs.ndim - c, lhs.ndim)) or tuple(rc) != tuple(range(c)) or kw:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
  out = _project(lhs, rhs, c)
  return out if preferred_element_type is None else out.astype(preferred_element_type)
