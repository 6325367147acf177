"""Shared building blocks, with logical axis names on every parameter."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.errors import UserError
from multimodal_jax.sharding import constrain


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
  last axes of `lhs` with the first of `rhs` (no batch axes): same values, cheaper weight gradient."""
  (lc, rc), (lb, rb) = dimension_numbers
  c = len(lc)
  if lb or rb or tuple(lc) != tuple(range(lhs.ndim - c, lhs.ndim)) or tuple(rc) != tuple(range(c)) or kw:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)
  out = _project(lhs, rhs, c)
  return out if preferred_element_type is None else out.astype(preferred_element_type)


def dense(features: int, axes: tuple[str, str] = ("embed", "mlp"), name: str | None = None, **kw) -> nn.Dense:
  """nn.Dense whose kernel is annotated `axes` (in, out) and bias `axes[1]`."""
  return nn.Dense(
    features,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
    name=name,
    **kw,
  )


class MLP(nn.Module):
  """Dense -> gelu -> (dropout) ... -> Dense(out). Input `[..., d]`, output `[..., out]`."""

  hidden: Sequence[int]
  out: int
  dropout: float = 0.0
  out_axis: str = "classes"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for i, width in enumerate(self.hidden):
      x = dense(width, ("embed", "mlp"), name=f"hidden_{i}")(x)
      x = nn.gelu(x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.out, ("mlp", self.out_axis), name="out")(x)


class ConvEncoder(nn.Module):
  """A small CNN: [conv 3x3 -> GroupNorm -> gelu -> 2x2 max-pool] per stage, then a projection.

  Input `[batch, height, width]` or `[batch, height, width, channels]`, output `[batch, features]`.
  """

  channels: Sequence[int] = (16, 32)
  features: int = 64
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim == 3:
      x = x[..., None]
    for i, ch in enumerate(self.channels):
      x = nn.Conv(
        ch,
        (3, 3),
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=f"conv_{i}",
      )(x)
      x = nn.GroupNorm(
        num_groups=min(8, ch),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=f"norm_{i}",
      )(x)
      x = nn.max_pool(nn.gelu(x), (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.gelu(dense(self.features, ("embed", "mlp"), name="proj")(x))


def flatten_batch(x: Any) -> jnp.ndarray:
  """`[batch, ...]` -> `[batch, prod(...)]`."""
  return jnp.reshape(x, (x.shape[0], -1))


def layer_norm(name: str | None = None, eps: float = 1e-5) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_erf(x: jnp.ndarray) -> jnp.ndarray:
  """Exact GELU, `x * Phi(x)` through erf as PyTorch's `nn.GELU()` (not jax.nn.gelu's erfc, which
  XLA expands into exp and divisions). Its VJP keeps only `x` and recomputes. Any shape."""
  return _gelu_erf(x)


def _gelu_erf(x):
  x32 = x.astype(jnp.float32)
  return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


def _gelu_erf_fwd(x):
  return _gelu_erf(x), x


def _gelu_erf_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF)
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32)
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_erf.defvjp(_gelu_erf_fwd, _gelu_erf_bwd)


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """OpenAI CLIP's `x * sigmoid(1.702 x)` (their original checkpoints were trained with it). Any shape."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
  "gelu": gelu_erf,  # exact (erf), as torch.nn.GELU()
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": quick_gelu,
}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r}: choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _bdot(a: jnp.ndarray, b: jnp.ndarray, a_axis: int, b_axis: int) -> jnp.ndarray:
  """Batched (over axes 0, 1) contraction of `a_axis` of `a` with `b_axis` of `b`."""
  return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0, 1), (0, 1))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attend_qkv(qkv: jnp.ndarray, causal: bool = False) -> jnp.ndarray:
  """Softmax attention from fused projections `qkv [batch, length, 3, heads, head_dim]` (q, k, v)
  -> `[batch, length, heads, head_dim]`; the softmax in float32, `causal` masks later keys.

  Laid out for XLA:CPU, whose fast dot kernels (YNNPACK) want the left operand contracted on its
  innermost axis: the scores are kept transposed (`[keys, queries]` per head) and k, v are also
  stored transposed, so that all six matmuls of the forward and backward pass take that form;
  written as plain einsums, XLA runs two of the backward matmuls in slower Eigen kernels and fuses
  the forward ones with the softmax into slow YNNPACK kernels (optimization barriers keep it from
  folding the transposes back into the dots). The VJP saves q, k, v, k^T and the probabilities and
  gets the softmax's row term from them (no extra matmul). 1.1-1.7x faster than the einsums on CPU.
  """
  return _attend_fwd(qkv, causal)[0]


def _attend_fwd(qkv, causal):
  scale = jnp.asarray(qkv.shape[-1] ** -0.5, qkv.dtype)
  q = jnp.transpose(qkv[:, :, 0], (0, 2, 1, 3)) * scale  # [b, h, q, e]
  k = jnp.transpose(qkv[:, :, 1], (0, 2, 1, 3))  # [b, h, k, e]
  v = jnp.transpose(qkv[:, :, 2], (0, 2, 1, 3))
  kt = jnp.transpose(qkv[:, :, 1], (0, 2, 3, 1))  # [b, h, e, k]
  vt = jnp.transpose(qkv[:, :, 2], (0, 2, 3, 1))
  q, k, v, kt, vt = jax.lax.optimization_barrier((q, k, v, kt, vt))
  st = _bdot(k, q, 3, 3).astype(jnp.float32)  # scores^T [b, h, k, q]
  if causal:
    n = st.shape[-1]
    st = jnp.where(jnp.arange(n)[:, None] <= jnp.arange(n)[None, :], st, -jnp.inf)
  e = jnp.exp(st - jnp.max(st, axis=2, keepdims=True))
  pt = (e / jnp.sum(e, axis=2, keepdims=True)).astype(qkv.dtype)  # probabilities^T [b, h, k, q]
  ot = jax.lax.optimization_barrier(_bdot(vt, pt, 3, 2))  # [b, h, e, q]
  return jnp.transpose(ot, (0, 3, 1, 2)), (q, k, v, kt, pt)


def _attend_bwd(causal, res, dout):
  del causal  # the masked probabilities are zero: their gradients vanish on their own
  q, _, v, kt, pt = res
  do = jax.lax.optimization_barrier(jnp.transpose(dout, (0, 2, 1, 3)))  # [b, h, q, e]
  dpt = _bdot(v, do, 3, 3).astype(jnp.float32)  # [b, h, k, q]
  pt32 = pt.astype(jnp.float32)
  dst = (pt32 * (dpt - jnp.sum(pt32 * dpt, axis=2, keepdims=True))).astype(q.dtype)  # d scores^T
  dk = _bdot(dst, q, 3, 2)  # [b, h, k, e] (q carries the scale)
  dqt = _bdot(kt, dst, 3, 2)  # [b, h, e, q]
  dv = _bdot(pt, do, 3, 2)  # [b, h, k, e]
  dk, dqt, dv = jax.lax.optimization_barrier((dk, dqt, dv))
  dq = jnp.transpose(dqt, (0, 3, 1, 2)) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  dkv = [jnp.transpose(t, (0, 2, 1, 3)) for t in (dk, dv)]
  return (jnp.stack([dq, *dkv], axis=2),)


attend_qkv.defvjp(_attend_fwd, _attend_bwd)


def attend_qkv_xla(qkv: jnp.ndarray, causal: bool = False) -> jnp.ndarray:
  """`attend_qkv` written as plain einsums (XLA picks the layouts)."""
  return _attend_einsum(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, causal)


# "auto" (or None): by backend, see `attention_implementation`; "cpu": `attend_qkv` (laid out for
# XLA:CPU) for unmasked self-attention, einsums elsewhere; "einsum": plain einsums, any backend;
# "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation (cuDNN's fused kernel
# keeps memory linear in the sequence length; it needs an NVIDIA GPU and bfloat16 / float16).
ATTENTION_IMPLEMENTATIONS = ("auto", "cpu", "einsum", "xla", "cudnn")


def attention_implementation(
  name: str | None, dtype: Any = jnp.float32, head_dim: int = 64, self_attention: bool = True
) -> str:
  """The concrete implementation ("cpu", "einsum", "xla" or "cudnn") that `name` means here.

  "auto" keeps the CPU's fastest path (`attend_qkv` for unmasked self-attention, einsums for the
  rest), picks cuDNN on a GPU when the dtype and head size suit its fused kernel, else "xla".
  Raises UserError for an unknown name or "cudnn" off a GPU.
  """
  name = "auto" if name is None else name
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise UserError(f"attention={name!r}: choose one of {'|'.join(ATTENTION_IMPLEMENTATIONS)}")
  backend = jax.default_backend()
  if name == "cudnn" and backend != "gpu":
    raise UserError(f"attention='cudnn' needs an NVIDIA GPU (this backend is {backend}): use auto or xla")
  if name != "auto":
    return name
  if backend == "cpu":
    return "cpu" if self_attention else "einsum"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
    return "cudnn"
  return "xla"


def _key_mask(mask: jnp.ndarray | None) -> jnp.ndarray | None:
  """A key mask `[B, S]` as `[B, 1, 1, S]`; a 4-D mask (broadcastable to `[B, N, T, S]`) as is."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, bool)
  if mask.ndim == 2:
    return mask[:, None, None, :]
  if mask.ndim != 4:
    raise ValueError(f"attention mask has shape {mask.shape}: give [batch, keys] or [batch, heads, queries, keys]")
  return mask


def _attend_einsum(q, k, v, mask, is_causal):
  """Softmax attention as einsums; `q [B, T, N, H]`, `k, v [B, S, N, H]`, `mask` 4-D or None.

  The softmax is in float32 with the row maximum held constant (the softmax does not depend on
  it), masked logits are -inf and a row with no valid key gives zeros.
  """
  logits = jnp.einsum("btnh,bsnh->bnts", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k).astype(jnp.float32)
  if is_causal:
    mask = _and_causal(mask, q.shape[1], k.shape[1])
  if mask is None:
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    logits = jnp.where(mask, logits, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    probs = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
  return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def _and_causal(mask, t, s):
  """`mask` and "query i sees keys j <= i" (aligned at the first position, as jax.nn's is_causal)."""
  causal = jnp.tril(jnp.ones((t, s), bool))[None, None]
  return causal if mask is None else mask & causal


def dot_product_attention(
  q: jnp.ndarray,
  k: jnp.ndarray,
  v: jnp.ndarray,
  *,
  mask: jnp.ndarray | None = None,
  is_causal: bool = False,
  implementation: str | None = "auto",
) -> jnp.ndarray:
  """Multi-head softmax attention: `q [B, T, N, H]`, `k, v [B, S, N, H]` -> `[B, T, N, H]`.

  `mask` bool `[B, S]` (valid keys) or broadcastable to `[B, N, T, S]`; `is_causal` hides keys after
  the query's position. Every implementation (see ATTENTION_IMPLEMENTATIONS) gives the same values:
  the softmax in float32, 1/sqrt(H) scaling, and zeros for a query row with no valid key.
  """
  mask = _key_mask(mask)
  t, s = q.shape[1], k.shape[1]
  impl = attention_implementation(implementation, q.dtype, q.shape[-1], self_attention=mask is None and t == s)
  if impl == "cpu" and mask is None and t == s:
    return attend_qkv(jnp.stack([q, k, v], axis=2), is_causal)
  if impl in ("cpu", "einsum"):
    return _attend_einsum(q, k, v, mask, is_causal)
  attend = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, is_causal=is_causal)
  if impl == "cudnn" and implementation in (None, "auto"):
    try:  # cuDNN refuses some shapes at trace time: "auto" then takes XLA's
      out = attend(implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
      out = attend(implementation="xla")
  else:
    out = attend(implementation=impl)
  if mask is not None:  # jax.nn gives a row without valid keys the mean of v: make it zero
    valid = jnp.any(_and_causal(mask, t, s) if is_causal else mask, axis=-1)  # [B | 1, N | 1, T | 1]
    out = jnp.where(jnp.transpose(valid, (0, 2, 1))[..., None], out, 0)
  return out


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused QKV projection. `[batch, length, width]` in and out,
  with an optional key mask bool `[batch, length]`.

  Params: `qkv/kernel [embed, 3, heads, head_dim]`, `qkv/bias [3, heads, head_dim]`,
  `out/kernel [heads, head_dim, embed]`, `out/bias [embed]` (PyTorch's in_proj/out_proj layout
  reshaped, so open_clip / OpenAI weights import exactly). `implementation`: one of
  ATTENTION_IMPLEMENTATIONS (None: "auto"); "auto" on CPU is `attend_qkv`, laid out for XLA:CPU.
  """

  heads: int
  causal: bool = False
  implementation: str | None = "auto"
  dtype: Any = None  # computation dtype of the projections (None: from the inputs and params)

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv = nn.DenseGeneral(
      (3, self.heads, head_dim),
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None, "heads", "kv")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "heads", "kv")),
      dtype=self.dtype,
      dot_general=projection_dot_general,
      name="qkv",
    )(x)
    qkv = constrain(qkv, ("activation_batch", "activation_length", None, "activation_heads", "activation_kv"))
    impl = attention_implementation(self.implementation, qkv.dtype, head_dim, self_attention=mask is None)
    if impl == "cpu" and mask is None:
      out = attend_qkv(qkv, self.causal)  # [batch, length, heads, head_dim]
    else:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      out = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.implementation)
    return nn.DenseGeneral(
      width,
      axis=(-2, -1),
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "kv", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      dtype=self.dtype,
      dot_general=projection_dot_general,
      name="out",
    )(out)


# Logical names of a `[batch, length, width]` activation (see sharding.LOGICAL_AXIS_RULES).
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


class TransformerBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). `[batch, length, width]`."""

  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  exact_gelu: bool = True  # PyTorch's nn.GELU(); False: the tanh approximation (as fast, since gelu_erf)
  activation: str | None = None  # a key of ACTIVATIONS; None: "gelu" or "gelu_tanh" after exact_gelu
  attention: str | None = "auto"  # one of ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jnp.ndarray, _=None):
    width = x.shape[-1]
    x = constrain(x, ACTIVATION)
    x = x + SelfAttention(self.heads, self.causal, self.attention, name="attn")(layer_norm("ln_1")(x))
    x = constrain(x, ACTIVATION)
    h = dense(int(width * self.mlp_ratio), ("embed", "mlp"), name="fc1", dot_general=projection_dot_general)(
      layer_norm("ln_2")(x)
    )
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    h = activation_fn(self.activation or ("gelu" if self.exact_gelu else "gelu_tanh"))(h)
    x = x + dense(width, ("mlp", "embed"), name="fc2", dot_general=projection_dot_general)(h)
    return constrain(x, ACTIVATION), None


class Transformer(nn.Module):
  """`layers` TransformerBlocks, under `nn.scan` unless `scan=False`. `[batch, length, width]`.

  With `remat` each block's activations are recomputed in the backward pass (memory for FLOPs).
  Scanned params carry a leading `[layers]` axis (logical name "layers", replicated by
  sharding.LOGICAL_AXIS_RULES).
  """

  layers: int
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  exact_gelu: bool = True
  scan: bool = True
  remat: bool = False
  activation: str | None = None
  # Scan iterations per loop trip (True: all; the params keep their [layers] axis either way). None:
  # all on the CPU backend, where the loop's stacking of residuals and gradients cost ~25% of a
  # train step, else 1. Unrolled, compile time grows with depth (forward + backward of ViT-B/32:
  # 3.6 s -> 8.5 s, ViT-L/14: 3.6 s -> 13 s here): pass 1 to keep it flat.
  unroll: int | bool | None = None
  attention: str | None = "auto"  # one of ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    kw = {
      "heads": self.heads,
      "mlp_ratio": self.mlp_ratio,
      "causal": self.causal,
      "exact_gelu": self.exact_gelu,
      "activation": self.activation,
      "attention": self.attention,
    }
    if self.scan:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=self.layers,
        unroll=(jax.default_backend() == "cpu") if self.unroll is None else self.unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(**kw, name="blocks")(x, None)
      return x
    for i in range(self.layers):
      x, _ = block(**kw, name=f"block_{i}")(x)
    return x
