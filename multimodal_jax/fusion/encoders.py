"""Per-modality encoders for fusion, chosen by the rank of a modality's examples.

- `[H, W, C]` (or AV-digits' spectrograms read as images): `layers.ConvEncoder`, a small 2-D CNN
- `[T, F]`: `layers.ConvEncoder(dims=1, pool="mean")`, 1-D convolutions over T, then the mean over time
- a vector or a scalar: `VectorEncoder`, a two-layer MLP

Each maps `[batch, ...]` to `[batch, features]`; `EncoderHead` adds a linear classifier on top (a
late-fusion predictor f_i(x_i)). `encoder_for_shape` picks one for a shape without the batch.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.layers import ConvEncoder, dense

IMAGE_CHANNELS = (16, 32)  # ConvEncoder stages for images (and AV-digits' spectrograms)
SEQUENCE_CHANNELS = (32, 64)  # ConvEncoder stages for [T, F] sequences


class EncoderHead(nn.Module):
  """f_i(x_i): a modality's encoder followed by a linear classifier, `[batch, ...] -> [batch, classes]`."""

  encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return dense(self.num_classes, ("mlp", "classes"), name="head")(self.encoder(x, train=train))


class VectorEncoder(nn.Module):
  """`[batch, ...]` (a vector or a scalar per example) -> `[batch, out]`: a two-layer MLP."""

  hidden: int = 128
  out: int = 64
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.gelu(dense(self.hidden, ("embed", "mlp"), name="hidden")(x.reshape(x.shape[0], -1)))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.gelu(dense(self.out, ("mlp", "embed"), name="proj")(x))


def encoder_for_shape(
  shape: tuple[int, ...], *, by_rank: bool, features: int, hidden: int, dropout: float = 0.0
) -> nn.Module:
  """The encoder of a modality whose examples (without the batch) have `shape`, all giving
  `[batch, features]`: by the shape's rank when `by_rank`, else the image CNN (AV-digits reads its
  spectrograms as images). `hidden` is the vector MLP's width."""
  if not by_rank or len(shape) == 3:
    return ConvEncoder(channels=IMAGE_CHANNELS, features=features, dropout=dropout)
  if len(shape) == 2:
    return ConvEncoder(channels=SEQUENCE_CHANNELS, features=features, dropout=dropout, dims=1, pool="mean")
  return VectorEncoder(hidden=hidden, out=features, dropout=dropout)
