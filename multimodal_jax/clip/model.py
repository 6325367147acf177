"""CLIP two-tower models: ViT or ResNet image tower, causal Transformer text tower, projections to a
shared embedding, a learnable logit scale and an optional logit bias (for the sigmoid loss).

Parameter layout follows OpenAI CLIP / open_clip (pre-LN blocks, class token, ln_pre / ln_post,
bias-free projections, text pooled at the end-of-text token) so their weights import exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.layers import ACTIVATION, ConvEncoder, Transformer, TransformerOptions, dense, layer_norm
from multimodal_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 32
  patch_size: int = 4
  width: int = 128
  layers: int = 4
  heads: int = 4
  mlp_ratio: float = 4.0
  pool: str = "token"  # "token" (class token, as CLIP) or "mean"
  tower: str = "vit"  # "vit" or "resnet"
  channels: int = 3


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 1000
  context_length: int = 16
  width: int = 128
  layers: int = 4
  heads: int = 4
  mlp_ratio: float = 4.0
  pad_id: int = 0


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  embed_dim: int = 128
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  init_logit_scale: float = math.log(1 / 0.07)
  max_logit_scale: float = 100.0
  init_logit_bias: float | None = None  # e.g. -10 for the sigmoid loss; None: no bias
  # How both towers' Transformers compute (see layers.TransformerOptions):
  activation: str = "gelu"  # exact erf GELU; "gelu_tanh"; "quick_gelu" (OpenAI's own weights)
  scan: bool = True
  remat: str | bool = "none"  # layers.REMAT_POLICIES
  scan_unroll: int | bool | None = None  # layers per scan trip; None: all on CPU, else 1
  attention: str = "auto"  # one of attention.ATTENTION_IMPLEMENTATIONS: auto, cpu, einsum, xla, cudnn
  # "transformer": the text tower above; "precomputed": texts arrive as a frozen (locked, LiT)
  # tower's features `[batch, width]` and only the text projection is trained.
  text_tower: str = "transformer"

  @property
  def transformer_options(self) -> TransformerOptions:
    """The options both towers' Transformers get from the fields above."""
    return TransformerOptions(
      activation=self.activation, attention=self.attention, scan=self.scan, remat=self.remat, unroll=self.scan_unroll
    )


def _vit(image_size, patch, width, layers, heads):
  return VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers, heads=heads)


_OPENAI_TEXT = TextConfig(vocab_size=49408, context_length=77, width=512, layers=12, heads=8)
PRESETS: dict[str, ClipConfig] = {
  "tiny": ClipConfig(),  # the benchmark / embedded-data shape
  "ViT-B-32": ClipConfig(embed_dim=512, vision=_vit(224, 32, 768, 12, 12), text=_OPENAI_TEXT),
  "ViT-B-16": ClipConfig(embed_dim=512, vision=_vit(224, 16, 768, 12, 12), text=_OPENAI_TEXT),
  "ViT-L-14": ClipConfig(
    embed_dim=768,
    vision=_vit(224, 14, 1024, 24, 16),
    text=dataclasses.replace(_OPENAI_TEXT, width=768, heads=12),
  ),
}


def _transformer(tower: nn.Module, causal: bool) -> Transformer:
  """The block stack of a tower (call inside its compact `__call__`), from its config and options."""
  config = tower.config
  return Transformer(config.layers, config.heads, config.mlp_ratio, causal, tower.options, name="transformer")


class VisionTransformer(nn.Module):
  """Images `[batch, H, W, C]` (float, normalized) -> features `[batch, width]` (before projection)."""

  config: VisionConfig
  options: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ValueError(
        f"images are {images.shape[1]}x{images.shape[2]} but this model takes "
        f"{cfg.image_size}x{cfg.image_size}: resize them (or use a preset of that size)"
      )
    x = nn.Conv(
      cfg.width,
      (cfg.patch_size, cfg.patch_size),
      strides=cfg.patch_size,
      padding="VALID",
      use_bias=False,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "embed")
      ),
      name="patch_embed",
    )(images)
    b, h, w, d = x.shape
    x = constrain(x.reshape(b, h * w, d), ACTIVATION)
    scale = d**-0.5
    if cfg.pool == "token":
      cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(scale), ("embed",)), (d,))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    pos = self.param(
      "positional_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(scale), ("length", "embed")),
      (x.shape[1], d),
    )
    x = layer_norm("ln_pre")(x + pos.astype(x.dtype))
    x = _transformer(self, causal=False)(x)
    pooled = x[:, 0] if cfg.pool == "token" else x.mean(axis=1)
    return layer_norm("ln_post")(pooled)


class ResNetTower(nn.Module):
  """A small convolutional image tower (ours, not OpenAI's ModifiedResNet): `[b, H, W, C]` -> `[b, width]`."""

  config: VisionConfig

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    w = self.config.width
    return ConvEncoder(channels=(w // 4, w // 2, w), features=w, name="convnet")(images)


class TextTransformer(nn.Module):
  """Token ids `[batch, context]` -> features `[batch, width]`, pooled at the end-of-text token
  (the last non-pad position, which is where OpenAI's argmax pooling lands too).

  With `return_tokens=True`: the whole sequence after `ln_final` `[batch, context, width]` and a
  mask bool `[batch, context]` that is True up to and including the end-of-text token (position <=
  the pooled one, not `tokens != pad_id`: in CLIP's BPE "!" shares id 0 with pad).
  """

  config: TextConfig
  options: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, return_tokens: bool = False):
    cfg = self.config
    if tokens.shape[-1] != cfg.context_length:
      raise ValueError(f"text has {tokens.shape[-1]} tokens but the model's context is {cfg.context_length}")
    embed = self.param(
      "token_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
      (cfg.vocab_size, cfg.width),
    )
    pos = self.param(
      "positional_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
      (cfg.context_length, cfg.width),
    )
    # The table is gathered whole along the width first (FSDP shards it there, as every weight):
    # split along the width, the lookup and its gradient's scatter would fight the batch split.
    embed = constrain(embed, ("vocab", "activation_embed"))
    x = constrain(jnp.take(embed, tokens, axis=0) + pos, ACTIVATION)
    x = _transformer(self, causal=True)(x)
    x = layer_norm("ln_final")(x)
    # The last non-pad position (not a count of non-pad ids: in CLIP's BPE, "!" shares id 0 with pad).
    eot = jnp.max(jnp.where(tokens != cfg.pad_id, jnp.arange(tokens.shape[-1]), 0), axis=-1)
    if return_tokens:
      return x, jnp.arange(tokens.shape[-1]) <= eot[:, None]
    return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]


class CLIP(nn.Module):
  """`__call__(images, tokens) -> (image_embeddings, text_embeddings, logit_scale, logit_bias)`.

  Embeddings are L2-normalized `[batch, embed_dim]`; `logit_scale` is exp(param) clamped at
  `max_logit_scale`; `logit_bias` is None unless `init_logit_bias` is set.
  """

  config: ClipConfig

  def setup(self):
    cfg = self.config
    if cfg.vision.tower == "vit":
      self.visual = VisionTransformer(cfg.vision, cfg.transformer_options)
    elif cfg.vision.tower == "resnet":
      self.visual = ResNetTower(cfg.vision)
    else:
      raise ValueError(f"image tower {cfg.vision.tower!r}: choose vit or resnet")
    if cfg.text_tower == "transformer":
      self.text = TextTransformer(cfg.text, cfg.transformer_options)
    elif cfg.text_tower != "precomputed":
      raise ValueError(f"text tower {cfg.text_tower!r}: choose transformer or precomputed")
    self.image_projection = dense(cfg.embed_dim, ("embed", "mlp"), use_bias=False)
    self.text_projection = dense(cfg.embed_dim, ("embed", "mlp"), use_bias=False)
    self.logit_scale = self.param(
      "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.init_logit_scale), ()), ()
    )
    if cfg.init_logit_bias is not None:
      self.logit_bias = self.param(
        "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(cfg.init_logit_bias), ()), ()
      )

  def encode_image(self, images: jnp.ndarray, normalize: bool = True) -> jnp.ndarray:
    x = self.image_projection(self.visual(images))
    return _l2_normalize(x) if normalize else x

  def encode_text(self, text: jnp.ndarray, normalize: bool = True) -> jnp.ndarray:
    """Token ids `[batch, context]`, or a locked tower's features `[batch, width]` when
    `text_tower="precomputed"` -> `[batch, embed_dim]`."""
    x = self.text_projection(self.text(text) if self.config.text_tower == "transformer" else text)
    return _l2_normalize(x) if normalize else x

  def encode_text_tokens(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Token ids `[batch, context]` -> the text tower's sequence after `ln_final` `[batch, context,
    width]` (no projection) and its mask bool `[batch, context]` (positions up to the end-of-text
    token, see `TextTransformer`)."""
    if self.config.text_tower != "transformer":
      raise ValueError("encode_text_tokens needs the transformer text tower (this model's is precomputed)")
    return self.text(tokens, return_tokens=True)

  def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray):
    scale = jnp.minimum(jnp.exp(self.logit_scale), self.config.max_logit_scale)
    bias = self.logit_bias if self.config.init_logit_bias is not None else None
    return self.encode_image(images), self.encode_text(tokens), scale, bias


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  x32 = x.astype(jnp.float32)
  return (x32 / jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-12)).astype(x.dtype)
