"""Multi-head softmax attention: one function with interchangeable implementations
(`dot_product_attention`, see ATTENTION_IMPLEMENTATIONS), a kernel laid out for XLA:CPU
(`attend_qkv`), and the self- and cross-attention modules built on them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.errors import UserError
from multimodal_jax.projection import projection_dot_general
from multimodal_jax.sharding import constrain, current_platform


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
  """The concrete implementation ("cpu", "einsum", "xla" or "cudnn") that `name` means for the platform
  being traced for (`sharding.current_platform`: the step's mesh, else the default backend).

  "auto" keeps the CPU's fastest path (`attend_qkv` for unmasked self-attention, einsums for the
  rest), picks cuDNN on a GPU for unmasked self-attention (causal or not) when the dtype and head size
  suit its fused kernel (its backward pass refuses jax.nn's mask tensors), else "xla".
  Raises UserError for an unknown name or "cudnn" off a GPU.
  """
  name = "auto" if name is None else name
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise UserError(f"attention={name!r}: choose one of {'|'.join(ATTENTION_IMPLEMENTATIONS)}")
  backend = current_platform()
  if name == "cudnn" and backend != "gpu":
    raise UserError(f"attention='cudnn' needs an NVIDIA GPU (this backend is {backend}): use auto or xla")
  if name != "auto":
    return name
  if backend == "cpu":
    return "cpu" if self_attention else "einsum"
  if (
    backend == "gpu"
    and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
    and self_attention
  ):
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


def _cudnn_even(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, is_causal: bool) -> jnp.ndarray:
  """cuDNN's fused attention for an odd sequence length (ViT's 197 tokens, CLIP's 77): its backward pass
  refuses odd lengths, so q, k, v are padded by one position and the padding is excluded through the
  kernel's own sequence lengths (no mask tensor, which it would also refuse); the output is cut back."""
  t, s = q.shape[1], k.shape[1]

  def pad(x, n):
    return jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))

  batch = q.shape[0]
  out = jax.nn.dot_product_attention(
    pad(q, t),
    pad(k, s),
    pad(v, s),
    is_causal=is_causal,
    query_seq_lengths=jnp.full((batch,), t, jnp.int32),
    key_value_seq_lengths=jnp.full((batch,), s, jnp.int32),
    implementation="cudnn",
  )
  return out[:, :t]


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
  if impl == "cudnn" and mask is None and (t % 2 or s % 2):
    return _cudnn_even(q, k, v, is_causal)
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


class CrossAttention(nn.Module):
  """Queries `x [B, N, D]` attend to `kv [B, M, D]` where `mask [B, M]` is True. `[B, N, D]` out.

  Params: `q/kernel [embed, heads, head_dim]`, `kv/kernel [embed, 2, heads, head_dim]`,
  `out/kernel [heads, head_dim, embed]` (with biases). A fully masked row attends to nothing and
  returns the output bias (DiT's null token keeps that from happening).
  """

  heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str | None = "auto"  # one of ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jnp.ndarray, kv: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    head_dim = width // self.heads

    def proj(features, axes, name):
      return nn.DenseGeneral(
        features,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        dot_general=projection_dot_general,
        name=name,
      )

    q = proj((self.heads, head_dim), ("embed", "heads", "kv"), "q")(x)
    k, v = jnp.moveaxis(proj((2, self.heads, head_dim), ("embed", None, "heads", "kv"), "kv")(kv), 2, 0)
    out = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
    return nn.DenseGeneral(
      width,
      axis=(-2, -1),
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "kv", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      dot_general=projection_dot_general,
      name="out",
    )(out)
