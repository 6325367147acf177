"""Shared building blocks, with logical axis names on every parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
