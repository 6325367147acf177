"""Shared building blocks, with logical axis names on every parameter: dense, MLP and conv
encoders, layer norm, activations, and the pre-LN Transformer (attention itself is in
`multimodal_jax.attention`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.attention import SelfAttention
from multimodal_jax.projection import projection_dot_general
from multimodal_jax.sharding import constrain, current_platform


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
  """A small CNN: [conv (kernel 3) -> GroupNorm -> gelu -> max-pool 2] per stage, then a projection.

  `dims=2` (images): input `[batch, height, width]` or `[batch, height, width, channels]`, what is
  left of the image after the stages flattened (`pool="flatten"`). `dims=1` (sequences): input
  `[batch, time, features]`, convolutions over time; a sequence's length need not be small, so it
  is averaged over time (`pool="mean"`). Output `[batch, features]`.
  """

  channels: Sequence[int] = (16, 32)
  features: int = 64
  dropout: float = 0.0
  dims: int = 2
  pool: str = "flatten"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.dims == 2 and x.ndim == 3:
      x = x[..., None]
    window = (2,) * self.dims
    kernel_axes = ("conv_height", "conv_width")[2 - self.dims :] + ("conv_in", "conv_out")
    for i, ch in enumerate(self.channels):
      x = nn.Conv(
        ch,
        (3,) * self.dims,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=f"conv_{i}",
      )(x)
      x = nn.GroupNorm(
        num_groups=min(8, ch),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=f"norm_{i}",
      )(x)
      x = nn.max_pool(nn.gelu(x), window, strides=window, padding="SAME")
    if self.pool == "mean":
      x = x.mean(axis=tuple(range(1, 1 + self.dims)))
    elif self.pool == "flatten":
      x = x.reshape(x.shape[0], -1)
    else:
      raise ValueError(f"ConvEncoder pool={self.pool!r}: flatten or mean")
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


# Logical names of a `[batch, length, width]` activation (see sharding.LOGICAL_AXIS_RULES).
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


# Rematerialization (`--config.remat`): which activations of a block the backward pass recomputes.
# "none": keep all; "full": keep only the block's input (recompute everything); "dots": keep the results
# of the matmuls, recompute the cheap elementwise work between them (norms, activations, softmax);
# "dots_no_batch": keep only the matmuls without batch dimensions (the projections and MLPs, not the
# attention scores, whose size grows with the sequence length squared).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _checkpoint_policy(policy: str | bool):
  """`(remat on?, jax.checkpoint policy)` of a REMAT_POLICIES name (True / False: "full" / "none", as
  configs saved before the names existed say)."""
  policy = {True: "full", False: "none"}.get(policy, policy) if isinstance(policy, bool) else policy
  policies = {
    "none": (False, None),
    "full": (True, None),
    "dots": (True, jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
  }
  if policy not in policies:
    raise ValueError(f"remat={policy!r}: choose one of {', '.join(REMAT_POLICIES)}")
  return policies[policy]


def remat(module: type[nn.Module], policy: str | bool) -> type[nn.Module]:
  """`module` wrapped for the REMAT_POLICIES name `policy` (per block: a scanned layer)."""
  on, checkpoint_policy = _checkpoint_policy(policy)
  return nn.remat(module, policy=checkpoint_policy) if on else module


def checkpointed(fn, policy: str | bool):
  """`fn` under `jax.checkpoint` with the REMAT_POLICIES name `policy`: remat at the granularity of a
  whole function (a shallow model's forward pass, where per-block remat would save little more)."""
  on, checkpoint_policy = _checkpoint_policy(policy)
  return jax.checkpoint(fn, policy=checkpoint_policy) if on else fn


@dataclasses.dataclass(frozen=True)
class TransformerOptions:
  """How a Transformer's blocks compute (frozen, so hashable: a Flax module attribute).

  `activation`: a key of ACTIVATIONS ("gelu" is the exact erf form, as PyTorch's nn.GELU();
  "gelu_tanh" its tanh approximation; "quick_gelu" OpenAI CLIP's). `attention`: one of
  attention.ATTENTION_IMPLEMENTATIONS (None: "auto"). `scan`: the blocks under `nn.scan`, params
  with a leading `[layers]` axis (logical name "layers"); else `block_{i}` subtrees. `remat`: which of
  each block's activations the backward pass recomputes (REMAT_POLICIES; memory for FLOPs). `unroll`: scan
  iterations per loop trip (True: all; the params keep their `[layers]` axis either way); None: all
  on the CPU backend, where the loop's stacking of residuals and gradients cost ~25% of a train
  step, else 1. Unrolled, compile time grows with depth (forward + backward of ViT-B/32: 3.6 s ->
  8.5 s, ViT-L/14: 3.6 s -> 13 s here): pass 1 to keep it flat. `dtype`: computation dtype of the
  attention and MLP projections (None: from the inputs and params, which stay as initialized).
  """

  activation: str = "gelu"
  attention: str | None = "auto"
  scan: bool = True
  remat: str | bool = "none"
  unroll: int | bool | None = None
  dtype: Any = None


class TransformerBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). `[batch, length, width]`."""

  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  options: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, x: jnp.ndarray, _=None):
    width, opts = x.shape[-1], self.options
    x = constrain(x, ACTIVATION)
    attn = SelfAttention(self.heads, self.causal, opts.attention, opts.dtype, name="attn")
    x = x + attn(layer_norm("ln_1")(x))
    x = constrain(x, ACTIVATION)
    fc1 = dense(
      int(width * self.mlp_ratio), ("embed", "mlp"), "fc1", dtype=opts.dtype, dot_general=projection_dot_general
    )
    h = constrain(fc1(layer_norm("ln_2")(x)), ("activation_batch", "activation_length", "activation_mlp"))
    h = activation_fn(opts.activation)(h)
    x = x + dense(width, ("mlp", "embed"), "fc2", dtype=opts.dtype, dot_general=projection_dot_general)(h)
    return constrain(x, ACTIVATION), None


class Transformer(nn.Module):
  """`layers` TransformerBlocks, `[batch, length, width]` in and out; `causal` masks later keys.
  See TransformerOptions for how they compute (scan, remat, activation, attention, ...)."""

  layers: int
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  options: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    opts = self.options
    block = remat(TransformerBlock, opts.remat)
    kw = {"heads": self.heads, "mlp_ratio": self.mlp_ratio, "causal": self.causal, "options": opts}
    if opts.scan:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=self.layers,
        unroll=(current_platform() == "cpu") if opts.unroll is None else opts.unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(**kw, name="blocks")(x, None)
      return x
    for i in range(self.layers):
      x, _ = block(**kw, name=f"block_{i}")(x)
    return x
