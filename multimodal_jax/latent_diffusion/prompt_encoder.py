"""Prompt encoders for a conditional denoiser, and the denoiser that owns one.

A prompt encoder turns a condition into cross-attention context: tokens `[B, L, width]` and a mask
`[B, L]` (True on real tokens). Three kinds:

* `TextEncoder`: a small bidirectional Transformer over word-level token ids, trained jointly with
  the denoiser (pad tokens are masked out of the context).
* `ClassEncoder`: one learned embedding per class, a context of one token.
* precomputed features (a locked tower's token features, see `multimodal_jax.text.featurisers`): passed
  through.

`ConditionedDenoiser` = a prompt encoder + `DiT`: `encode_prompt(inputs) -> (context, mask)`,
`denoise(x_t, t, context, mask) -> model output`; params `{"prompt": ..., "dit": ...}`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.latent_diffusion.dit import DiT, DiTConfig
from multimodal_jax.layers import Transformer, layer_norm

PROMPT_KINDS = ("text", "class", "features")


class TextEncoder(nn.Module):
  """Token ids `[B, L]` (`pad_id` on padding) -> (features `[B, L, width]`, mask bool `[B, L]`)."""

  vocab_size: int
  context_length: int
  width: int = 128
  layers: int = 2
  heads: int = 4
  pad_id: int = 0

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    if ids.shape[-1] != self.context_length:
      raise ValueError(f"token ids have length {ids.shape[-1]} but the text encoder takes {self.context_length}")
    init = nn.initializers.normal(0.02)
    table = self.param(
      "token_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (self.vocab_size, self.width)
    )
    positions = self.param(
      "position_embedding", nn.with_logical_partitioning(init, ("length", "embed")), (self.context_length, self.width)
    )
    x = jnp.take(table, ids, axis=0) + positions[None]
    x = Transformer(layers=self.layers, heads=self.heads, name="transformer")(x)
    return layer_norm("ln_final")(x), ids != self.pad_id


class ClassEncoder(nn.Module):
  """Labels int `[B]` -> (one embedding token `[B, 1, width]`, mask all True `[B, 1]`)."""

  num_classes: int
  width: int = 128

  @nn.compact
  def __call__(self, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed")),
      (self.num_classes, self.width),
    )
    return jnp.take(table, labels, axis=0)[:, None], jnp.ones((labels.shape[0], 1), bool)


class ConditionedDenoiser(nn.Module):
  """A prompt encoder (`prompt`: "text", "class" or "features") and a DiT over latents.

  Prompt inputs: "text": `{"ids": int [B, L]}`; "class": `{"label": int [B]}`; "features":
  `{"features": [B, L, d], "mask": bool [B, L]}`. The DiT's `context_dim` must equal the encoder's
  width (or `d`).
  """

  dit: DiTConfig
  prompt: str
  vocab_size: int = 0
  context_length: int = 16
  num_classes: int = 10
  text_width: int = 128
  text_layers: int = 2
  text_heads: int = 4

  def setup(self):
    if self.prompt not in PROMPT_KINDS:
      raise ValueError(f"prompt encoder {self.prompt!r}: choose one of {PROMPT_KINDS}")
    if self.prompt == "text":
      self.encoder = TextEncoder(
        self.vocab_size, self.context_length, self.text_width, self.text_layers, self.text_heads, name="prompt"
      )
    elif self.prompt == "class":
      self.encoder = ClassEncoder(self.num_classes, self.text_width, name="prompt")
    self.denoiser = DiT(self.dit, name="dit")

  def encode_prompt(self, inputs: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Prompt inputs -> (context `[B, L, d]`, mask bool `[B, L]`)."""
    if self.prompt == "text":
      return self.encoder(inputs["ids"])
    if self.prompt == "class":
      return self.encoder(inputs["label"])
    return inputs["features"], inputs["mask"].astype(bool)

  def denoise(self, x_t: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return self.denoiser(x_t, t, context, mask)

  def __call__(self, x_t: jnp.ndarray, t: jnp.ndarray, inputs: dict) -> jnp.ndarray:
    return self.denoise(x_t, t, *self.encode_prompt(inputs))
