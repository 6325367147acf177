"""DiT: a Transformer denoiser over latent patches (Peebles & Xie, 2023) with cross-attention to
conditioning tokens.

`x_t [B, H, W, C]` is cut into `p x p` patches (reshape + dense) with fixed 2-D sin-cos position
embeddings. The timestep's sinusoidal embedding, through an MLP, gives `c [B, width]`; every block
modulates three sub-layers (self-attention, cross-attention, MLP) with shift / scale / gate from `c`
(adaLN-zero: the modulation starts at zero, so every block starts as the identity). Cross-attention
looks at the projected context tokens and at one learned null token, so that a context whose mask
is all False ("no condition", for classifier-free guidance) is well defined. A final adaLN layer and
a zero-initialised projection unpatchify to `[B, H, W, C]` (`2C` with `learn_sigma`): the output is
exactly zero at initialisation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from multimodal_jax.attention import CrossAttention, SelfAttention
from multimodal_jax.layers import ACTIVATION, activation_fn, remat
from multimodal_jax.projection import projection_dot_general
from multimodal_jax.sharding import constrain, current_platform


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  input_size: int = 8  # latent height = width
  in_channels: int = 4
  patch_size: int = 2
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  context_dim: int = 128  # width of the conditioning tokens
  learn_sigma: bool = False  # output 2 * in_channels (noise and a variance interpolation)
  scan_layers: bool = True
  remat: str | bool = "none"  # layers.REMAT_POLICIES
  dtype: str = "float32"  # compute dtype; params stay float32
  frequency_dim: int = 256  # sinusoidal timestep features
  activation: str = "gelu_tanh"  # a key of layers.ACTIVATIONS (DiT uses the tanh GELU)
  # Blocks per scan trip (True: all; None: all on CPU, else 1, as layers.Transformer). 1 by default: on CPU the
  # rolled loop trained ~1.4x faster than the unrolled one (benchmarks/diffusion.py; unlike the CLIP towers).
  scan_unroll: int | bool | None = 1
  attention: str | None = "auto"  # a key of attention.ATTENTION_IMPLEMENTATIONS (None: auto), self and cross

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def num_patches(self) -> int:
    return (self.input_size // self.patch_size) ** 2


PRESETS: dict[str, dict] = {
  "tiny": {"width": 128, "depth": 4, "num_heads": 4},  # 8x8x4 latents on CPU
  "S": {"width": 384, "depth": 12, "num_heads": 6},
  "B": {"width": 768, "depth": 12, "num_heads": 12},
  "L": {"width": 1024, "depth": 24, "num_heads": 16},
  "XL": {"width": 1152, "depth": 28, "num_heads": 16},
}


def dit_config(preset: str, **overrides) -> DiTConfig:
  """The DiTConfig of a preset ("tiny", "S", "B", "L", "XL": DiT paper widths / depths / heads) with
  overrides, e.g. `dit_config("B", input_size=32, patch_size=2, context_dim=768)`."""
  if preset not in PRESETS:
    raise ValueError(f"DiT preset {preset!r}: choose one of {sorted(PRESETS)}")
  return DiTConfig(**{**PRESETS[preset], **overrides})


def sincos_2d(width: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings `[grid * grid, width]` (row-major patches): half the
  channels encode the row, half the column, each as [sin, cos] over `width / 4` frequencies."""
  if width % 4:
    raise ValueError(f"DiT width {width} must be divisible by 4 for 2-D sin-cos position embeddings")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

  def embed(pos):
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([embed(rows), embed(cols)], axis=1).astype(np.float32)


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal features of (possibly fractional) timesteps `t [B]` -> `[B, dim]`, [cos, sin] halves."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, axes, name, init=None, dtype=jnp.float32, use_bias=True):
  """nn.Dense annotated `axes` (in, out), bias `axes[1]`; `init` defaults to lecun normal."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
    dot_general=projection_dot_general,
    name=name,
  )


# Logical names of a per-example vector `[batch, width]` (the conditioning and its modulations).
VECTOR = ("activation_batch", "activation_embed")


def _norm(x):
  """LayerNorm without affine parameters (the modulation supplies them), eps 1e-6, in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """adaLN-zero block: `x += g1 * attn(mod(norm(x)))`, `x += g2 * cross(mod(norm(x)), ctx)`,
  `x += g3 * mlp(mod(norm(x)))`, with the 9 shift / scale / gate vectors from `c` (zero at init).

  `x [B, N, D]`, `c [B, D]` (already through SiLU), `ctx [B, M, D]`, `mask [B, M]`. Returns `(x, None)`
  (the nn.scan carry form).
  """

  config: DiTConfig

  @nn.compact
  def __call__(self, x, c, ctx, mask):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    width = x.shape[-1]
    mod = _dense(9 * width, ("embed", "mlp"), "modulation", nn.initializers.zeros_init(), dtype)(c)
    mod = constrain(mod, VECTOR)
    shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = jnp.split(mod, 9, axis=-1)
    x = constrain(x, ACTIVATION)
    attn = SelfAttention(cfg.num_heads, implementation=cfg.attention, dtype=dtype, name="attn")
    x = x + gate1[:, None] * attn(_modulate(_norm(x), shift1, scale1))
    cross = CrossAttention(cfg.num_heads, dtype, cfg.attention, name="cross")
    x = x + gate2[:, None] * cross(_modulate(_norm(x), shift2, scale2), ctx, mask)
    h = _dense(int(width * cfg.mlp_ratio), ("embed", "mlp"), "fc1", dtype=dtype)(_modulate(_norm(x), shift3, scale3))
    h = _dense(width, ("mlp", "embed"), "fc2", dtype=dtype)(activation_fn(cfg.activation)(h))
    return constrain(x + gate3[:, None] * h, ACTIVATION), None


class DiT(nn.Module):
  """`__call__(x_t [B, H, W, C], t int [B], context [B, L, context_dim], context_mask bool [B, L])`
  -> `[B, H, W, out_channels]` (float32). Masked context tokens have no effect; an all-False mask
  means "unconditional"."""

  config: DiTConfig

  @nn.compact
  def __call__(self, x_t, t, context, context_mask, train: bool = False):
    del train  # no dropout: the argument keeps the experiment-facing signature uniform
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, ch = x_t.shape
    p = cfg.patch_size
    if (h, w, ch) != (cfg.input_size, cfg.input_size, cfg.in_channels):
      raise ValueError(
        f"DiT input is {h}x{w}x{ch} but the config expects {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}"
      )
    if h % p:
      raise ValueError(f"DiT input size {h} is not divisible by patch_size {p}")
    if context.shape[-1] != cfg.context_dim or context_mask.shape != context.shape[:2]:
      raise ValueError(
        f"context {context.shape} / mask {context_mask.shape} do not fit [batch, length, {cfg.context_dim}] / "
        "[batch, length]"
      )
    g = h // p

    # Patchify: [B, H, W, C] -> [B, g*g, p*p*C] (row-major patches, each p x p x C).
    patches = x_t.astype(dtype).reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * ch)
    x = _dense(cfg.width, ("conv_in", "embed"), "patch_embed", dtype=dtype)(patches)
    x = constrain(x + jnp.asarray(sincos_2d(cfg.width, g), dtype)[None], ACTIVATION)

    # Timestep conditioning (SiLU applied once here; every modulation layer starts with it in DiT).
    temb = timestep_embedding(t, cfg.frequency_dim).astype(dtype)
    normal = nn.initializers.normal(0.02)
    temb = constrain(_dense(cfg.width, (None, "embed"), "time_mlp_1", normal, dtype)(temb), VECTOR)
    temb = constrain(_dense(cfg.width, ("mlp", "embed"), "time_mlp_2", normal, dtype)(nn.silu(temb)), VECTOR)
    c = constrain(nn.silu(temb), VECTOR)

    # Context: masked tokens zeroed (their values cannot leak), projected, one learned null token first.
    context_mask = context_mask.astype(bool)
    ctx = jnp.where(context_mask[..., None], context.astype(dtype), 0)
    ctx = _dense(cfg.width, ("mlp", "embed"), "context_proj", dtype=dtype)(ctx)
    null = self.param("null_token", nn.with_logical_partitioning(normal, ("embed",)), (cfg.width,))
    ctx = jnp.concatenate([jnp.broadcast_to(null.astype(dtype), (b, 1, cfg.width)), ctx], axis=1)
    ctx = constrain(ctx, ACTIVATION)
    mask = jnp.concatenate([jnp.ones((b, 1), bool), context_mask], axis=1)

    block = remat(DiTBlock, cfg.remat)
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.depth,
        unroll=(current_platform() == "cpu") if cfg.scan_unroll is None else cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(cfg, name="blocks")(x, c, ctx, mask)
    else:
      for i in range(cfg.depth):
        x, _ = block(cfg, name=f"block_{i}")(x, c, ctx, mask)

    # Final adaLN layer and the zero-initialised projection back to patches.
    zeros = nn.initializers.zeros_init()
    shift, scale = jnp.split(_dense(2 * cfg.width, ("embed", "mlp"), "final_modulation", zeros, dtype)(c), 2, -1)
    x = _modulate(_norm(x), shift, scale)
    out_ch = cfg.out_channels
    x = _dense(p * p * out_ch, ("embed", "conv_out"), "final", zeros, dtype)(x)
    x = x.reshape(b, g, g, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, out_ch)
    return x.astype(jnp.float32)


def unscanned_params(params: dict, depth: int) -> dict:
  """Params of a `scan_layers=True` DiT as those of the same model with `scan_layers=False`."""
  params = dict(params)
  blocks = params.pop("blocks")
  for i in range(depth):
    params[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
  return params
