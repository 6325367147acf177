"""KL-regularised convolutional autoencoder laid out as diffusers' `AutoencoderKL` (Stable Diffusion's VAE).

  model = AutoencoderKL(PRESETS["digits"])
  params = model.init(jax.random.key(0), images)["params"]               # images [B, H, W, C] in [-1, 1]
  mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
  images = model.apply({"params": params}, latents, method=AutoencoderKL.decode)

Encoder: conv_in, one down block per entry of `block_out_channels` (`layers_per_block` ResnetBlock2Ds, then a
stride-2 conv after a (0, 1, 0, 1) zero pad, except in the last block), a mid block (resnet, single-head
self-attention over the pixels, resnet), GroupNorm + SiLU, conv_out to `2 * latent_channels` (mean, logvar), 1x1
quant_conv. The decoder mirrors it: 1x1 post_quant_conv, conv_in, mid block, up blocks of `layers_per_block + 1`
resnets followed by nearest x2 upsampling and a conv, GroupNorm + SiLU, conv_out. Module and parameter names follow
the PyTorch ones (`down_blocks.0.resnets.1.conv1.weight` is `down_blocks_0/resnets_1/conv1/kernel`), so
`multimodal_jax.latent_diffusion.diffusers_vae` imports diffusers weights. Arrays are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from multimodal_jax.errors import UserError
from multimodal_jax.layers import dense

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
# The attention's q / k / v / out projections are 1x1 convolutions over channels: same axis names.
_PROJ_AXES = ("conv_in", "conv_out")
_EPS = 1e-6  # diffusers' resnet_eps / GroupNorm eps in the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Field names as in diffusers' `AutoencoderKL` config (DownEncoderBlock2D / UpDecoderBlock2D, SiLU only).

  `scaling_factor` / `shift_factor`: latents go to a diffusion model as `(z - shift) * scale`; None until
  measured (`measure_scale_factor`) or read from a diffusers config.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: str = "float32"  # compute dtype; params are float32
  scaling_factor: float | None = None
  shift_factor: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise UserError("AutoencoderKLConfig.block_out_channels is empty: give at least one width, e.g. (64,)")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise UserError(
          f"AutoencoderKLConfig: block_out_channels {self.block_out_channels} are not all divisible by "
          f"norm_num_groups={self.norm_num_groups}; pick a group count that divides every width"
        )

  @property
  def downsampling_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> AutoencoderKLConfig:
    """From a diffusers AutoencoderKL `config.json` dict; options this port lacks raise UserError."""
    config = dict(config)
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise UserError(f"config.json describes a {name}, not an AutoencoderKL; only AutoencoderKL weights import")
    blocks = list(config.get("block_out_channels", cls.block_out_channels))
    for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = list(config.get(key, [expected] * len(blocks)))
      bad = [t for t in types if t != expected]
      if bad:
        raise UserError(f"config.json has {key} containing {bad[0]!r}; only {expected} is implemented")
      if len(types) != len(blocks):
        raise UserError(f"config.json has {len(types)} {key} but {len(blocks)} block_out_channels; they must match")
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):
      raise UserError(f"config.json has act_fn={act!r}; only silu is implemented")
    ours = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    ignored = {"down_block_types", "up_block_types", "act_fn", "sample_size", "force_upcast"}
    ignored |= {"latents_mean", "latents_std"}  # per-channel latent statistics: not used by the model
    for key in config:
      if not key.startswith("_") and key not in ours | ignored:
        raise UserError(f"config.json has option {key!r}, which this AutoencoderKL port does not implement")
    return cls(**{k: v for k, v in config.items() if k in ours})


PRESETS: dict[str, AutoencoderKLConfig] = {
  # 32x32x1 digits -> 8x8x4 latents; small enough to train on a laptop CPU in minutes.
  # (32, 64, 64) reconstructs no better per step and costs 2.4x the FLOPs (76 vs 32 GFLOP per batch-64 train step).
  "digits": AutoencoderKLConfig(
    in_channels=1, out_channels=1, block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8
  ),
  # 64x64 and larger: one more down block, latents at image_size / 8 (64x64x3 -> 8x8x4).
  "small_f8": AutoencoderKLConfig(
    in_channels=3, out_channels=3, block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8
  ),
  # Stable Diffusion 1.x / 2.x VAE (stabilityai/sd-vae-ft-mse and the SD checkpoints' vae/ folder).
  "sd": AutoencoderKLConfig(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215
  ),
}


def preset_for_size(image_size: int) -> str:
  """The small preset for `image_size`: `digits` (latents at image_size / 4) up to 32 px, `small_f8`
  (image_size / 8) above, so the latent grid stays at most 8 wide up to 64 px."""
  return "digits" if image_size <= 32 else "small_f8"


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: Any = None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)) if isinstance(pad, int) else pad,
    dtype=dtype,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )


def _group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=_EPS,
    dtype=dtype,
    use_fast_variance=False,  # E[(x - mean)^2], as torch: E[x^2] - mean^2 loses digits on large activations
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3, twice, plus the input (through a 1x1 conv when the width changes)."""

  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.features, 3, self.dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.features, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class SpatialAttention(nn.Module):
  """One-head self-attention over the `H * W` pixels with a GroupNorm in front and the input added back."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    y = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, c)
    q, k, v = (dense(c, _PROJ_AXES, name=n, dtype=self.dtype)(y) for n in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c**-0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = dense(c, _PROJ_AXES, name="to_out", dtype=self.dtype)(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """resnet, [attention], resnet at constant width."""

  groups: int
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = SpatialAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Zero pad (0, 1) at the bottom and right, then a stride-2 conv3x3: `[B, H, W, C]` -> `[B, H/2, W/2, C]`."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=0)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a conv3x3: `[B, H, W, C]` -> `[B, 2H, 2W, C]`."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


class DownBlock(nn.Module):
  """diffusers' DownEncoderBlock2D: `layers` resnets to `features` wide, then an optional Downsample."""

  features: int
  layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for j in range(self.layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    return Downsample(self.dtype, name="downsamplers_0")(x) if self.downsample else x


class UpBlock(nn.Module):
  """diffusers' UpDecoderBlock2D: `layers` resnets to `features` wide, then an optional Upsample."""

  features: int
  layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for j in range(self.layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    return Upsample(self.dtype, name="upsamplers_0")(x) if self.upsample else x


class Encoder(nn.Module):
  """`[B, H, W, in_channels]` -> `[B, H / f, W / f, 2 * latent_channels]` (before quant_conv)."""

  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    g = cfg.norm_num_groups
    x = _conv(cfg.block_out_channels[0], 3, dtype, "conv_in")(x.astype(dtype))
    last = len(cfg.block_out_channels) - 1
    for i, width in enumerate(cfg.block_out_channels):
      x = DownBlock(width, cfg.layers_per_block, g, i < last, dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, cfg.mid_block_add_attention, dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(g, dtype, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, dtype, "conv_out")(x)


class Decoder(nn.Module):
  """`[B, h, w, latent_channels]` (after post_quant_conv) -> `[B, h * f, w * f, out_channels]`."""

  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    g = cfg.norm_num_groups
    widths = cfg.block_out_channels[::-1]
    x = _conv(widths[0], 3, dtype, "conv_in")(z.astype(dtype))
    x = MidBlock(g, cfg.mid_block_add_attention, dtype, name="mid_block")(x)
    for i, width in enumerate(widths):
      x = UpBlock(width, cfg.layers_per_block + 1, g, i < len(widths) - 1, dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(g, dtype, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """KL autoencoder. Images `[B, H, W, C]` in [-1, 1], H and W multiples of `config.downsampling_factor`."""

  config: AutoencoderKLConfig

  def setup(self):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, dtype, "quant_conv") if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(cfg.latent_channels, 1, dtype, "post_quant_conv") if cfg.use_post_quant_conv else None

  def encode(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Images `[B, H, W, C]` -> posterior (mean, logvar), each float32 `[B, H / f, W / f, latent_channels]`."""
    factor = self.config.downsampling_factor
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise UserError(
        f"AutoencoderKL.encode got images of shape {tuple(x.shape)}; expected [batch, height, width, channels] "
        f"with height and width multiples of {factor}"
      )
    h = self.encoder(x)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """Latents `[B, h, w, latent_channels]` (unscaled) -> images float32 `[B, h * f, w * f, out_channels]`."""
    z = z.astype(jnp.dtype(self.config.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(
    self, x: jnp.ndarray, sample_rng: jax.Array | None = None, train: bool = False
  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """-> (reconstruction, mean, logvar); decodes a posterior sample with `sample_rng`, else the mean.

    `train` is accepted for the trainer's calling convention; the model has no dropout or batch statistics.
    """
    del train
    mean, logvar = self.encode(x)
    z = mean
    if sample_rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


def kl_divergence(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example: `[B, ...]` -> `[B]`, summed over the other axes."""
  axes = tuple(range(1, mean.ndim))
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


def autoencoder_loss(
  model: AutoencoderKL,
  params: Any,
  x: jnp.ndarray,
  rng: jax.Array,
  kl_weight: float = 1e-6,
  reconstruction: str = "mse",
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The first-stage loss: reconstruction of a posterior sample + `kl_weight` * KL, as in latent diffusion.

  Both terms are summed over each example (pixels, latent dims) and averaged over the batch (LDM's weighting,
  where SD's `kl_weight` 1e-6 was set). `reconstruction`: "mse" (squared error) or "l1" (absolute error).
  `x`: images `[B, H, W, C]` in [-1, 1]. aux: `reconstruction_mse` (mean per pixel), `kl` (mean per example).
  """
  if reconstruction not in ("mse", "l1"):
    raise UserError(f"autoencoder_loss: reconstruction={reconstruction!r}; choose 'mse' or 'l1'")
  recon, mean, logvar = model.apply({"params": params}, x, sample_rng=rng, train=True)
  err = recon - x.astype(jnp.float32)
  per_pixel = jnp.square(err) if reconstruction == "mse" else jnp.abs(err)
  rec = jnp.mean(jnp.sum(per_pixel.reshape(x.shape[0], -1), axis=-1))
  kl = jnp.mean(kl_divergence(mean, logvar))
  return rec + kl_weight * kl, {"reconstruction_mse": jnp.mean(jnp.square(err)), "kl": kl}


def measure_scale_factor(mean_latents: Any) -> float:
  """`1 / std` of a batch of latents (any shape), as Stable Diffusion's 0.18215 was measured."""
  latents = np.asarray(mean_latents, np.float64)
  std = float(latents.std())
  if not np.isfinite(std) or std == 0.0:
    raise UserError(f"measure_scale_factor: the latents have std {std}; encode a batch of real images first")
  return 1.0 / std
