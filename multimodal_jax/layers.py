"""Shared building blocks, with logical axis names on every parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


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


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused QKV projection. `[batch, length, width]` in and out.

  Params: `qkv/kernel [embed, 3, heads, head_dim]`, `qkv/bias [3, heads, head_dim]`,
  `out/kernel [heads, head_dim, embed]`, `out/bias [embed]` (PyTorch's in_proj/out_proj layout
  reshaped, so open_clip / OpenAI weights import exactly).
  """

  heads: int
  causal: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv = nn.DenseGeneral(
        (3, self.heads, head_dim),
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None, "heads", "kv")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "heads", "kv")),
        name="qkv",
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, length, heads, head_dim]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
    if self.causal:
      length = x.shape[1]
      mask = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(
        width,
        axis=(-2, -1),
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="out",
    )(out)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). `[batch, length, width]`."""

  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  exact_gelu: bool = True  # PyTorch's nn.GELU(); False: the tanh approximation (cheaper on CPU)

  @nn.compact
  def __call__(self, x: jnp.ndarray, _=None):
    width = x.shape[-1]
    x = x + SelfAttention(self.heads, self.causal, name="attn")(layer_norm("ln_1")(x))
    h = dense(int(width * self.mlp_ratio), ("embed", "mlp"), name="fc1")(layer_norm("ln_2")(x))
    h = nn.gelu(h, approximate=not self.exact_gelu)
    x = x + dense(width, ("mlp", "embed"), name="fc2")(h)
    return x, None


class Transformer(nn.Module):
  """`layers` TransformerBlocks, under `nn.scan` (compile time flat in depth) unless `scan=False`.

  With `remat` each block's activations are recomputed in the backward pass (memory for FLOPs).
  Scanned params carry a leading `[layers]` axis (logical name None: never sharded).
  """

  layers: int
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  exact_gelu: bool = True
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    kw = dict(heads=self.heads, mlp_ratio=self.mlp_ratio, causal=self.causal, exact_gelu=self.exact_gelu)
    if self.scan:
      stack = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          length=self.layers,
          metadata_params={nn.PARTITION_NAME: None},  # the layer axis stays unsharded
      )
      x, _ = stack(**kw, name="blocks")(x, None)
      return x
    for i in range(self.layers):
      x, _ = block(**kw, name=f"block_{i}")(x)
    return x
