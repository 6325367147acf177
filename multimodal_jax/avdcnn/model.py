"""AVDCNN (Hou et al., IEEE TETCI 2018, arXiv 1709.00944): audio-visual speech enhancement with
multi-task reconstruction of the noisy frame's clean log power and the mouth image.

Inputs per example (one STFT frame t with ±2 context frames):
- `audio` `[batch, 257, 5]`: the noisy normalized log-power spectrum, bins × context frames.
- `lips` `[batch, 5, 16, 24, 3]`: the mouth images of the same 5 frames, each scaled to 0-1 and
  normalized per image (`normalize_lips`).

Outputs: `{"audio": [batch, 257]}` (the enhanced normalized log-power frame t) and, for models that
see the lips, `"visual": [batch, 1152]` (the normalized mouth image of frame t, 16×24×3 flattened).

Taken from the paper: the audio CNN conv 12×2 (10) -> max-pool 2×1 -> conv 5×1 (4); the visual CNN
conv 15×2 (12) -> 7×2 (10) -> 3×2 (6); linear activations, stride 1, batch norm after every conv;
flatten + concatenate -> FC 1000 sigmoid -> FC 800 sigmoid, dropout 0.1 after each; two linear heads.

Chosen here, where the paper is not specific:
- Padding is VALID. The audio CNN then gives 119×4×4 = 1,904 units on the 257×5 input.
- Mouth layout: the paper's 15-tall kernels cannot slide over 16×24 images stacked as given (a
  height of 16 leaves 2 rows after the first conv, too few for the 7-tall second one). Each image
  is transposed to 24×16 (mouth width along the kernel's tall axis) and the 5 frames are placed
  side by side along the other axis: a `[24, 80, 3]` input. The visual CNN then gives 2×77×6 = 924
  units, and the concatenation 2,828 units, not the paper's 2,804 (which no VALID layout of these
  kernels reproduces exactly; `flat_widths` derives the sizes from the input shapes).
- Head widths are the data's, 257 (a frame) and 1152 (a 16×24×3 image), not the paper's 600 and 1500.
- `fusion="early"`: one CNN (the audio CNN's layers) on the stacked inputs: the 5 mouth frames,
  each flattened to 1152 values, are appended to the 257 bins along the feature axis, giving a
  `[1409, 5]` input with the context frames along the width as for audio alone.
- The audio head (`head`): the loss is always the paper's, on the enhanced frame itself.
  `"gain"` (default): attenuation only, `Ŷ = X_t - softplus(W h + b)` with X_t the noisy centre
  frame, W = 0 and b = `gain_bias` = -3 at init (output = input - 0.05); the enhanced frame can
  never exceed the noisy one, so the model cannot add energy or hallucinate speech.
  `"residual"`: `Ŷ = X_t + W h + b` (zero-initialised, starts as the identity). `"plain"`: the
  paper's linear head. (How they compare: docs/results/avdcnn.md.)
- Presets: `paper` (the layers above), `wide` (2,048 + 2,048 shared sigmoid units instead of
  1,000 + 800), `tiny` (tests).
- Batch norm: training normalizes with the current batch's statistics (the step is pure; running
  averages are discarded). Inference uses population statistics from training batches with the
  final params (`population_batch_stats`, "precise BN": the mean of the batch means, the pooled
  variance), kept as the train state's `model_state` for every checkpoint the trainer saves, so it
  never depends on which frames share a test batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from multimodal_jax.arrays import floating_dtype
from multimodal_jax.layers import dense

BINS = 257
CONTEXT = 5
LIPS_SHAPE = (16, 24, 3)
LIPS_SIZE = 16 * 24 * 3
MODALITIES = ("audio", "visual")
FUSIONS = ("joint", "early")
HEADS = ("gain", "residual", "plain")
CONV_IMPLS = ("auto", "xla", "banded")
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class AVDCNNConfig:
  """Hyperparameters. `modalities=("audio",)` is the audio-only ablation (ADCNN)."""

  modalities: tuple[str, ...] = ("audio", "visual")
  fusion: str = "joint"  # joint: one CNN per modality, fused at the FC layers; early: one CNN on stacked inputs
  audio_convs: tuple[tuple[int, int, int], ...] = ((12, 2, 10), (5, 1, 4))  # (height, width, filters)
  audio_pool: tuple[int, int] = (2, 1)  # after the first audio conv
  visual_convs: tuple[tuple[int, int, int], ...] = ((15, 2, 12), (7, 2, 10), (3, 2, 6))
  hidden: tuple[int, ...] = (1000, 800)
  dropout: float = 0.1
  head: str = "gain"  # audio head: gain | residual | plain (the paper's); see the module docstring
  gain_bias: float = -3.0  # gain head: initial attenuation softplus(gain_bias) ~ 0.05 normalized units
  bins: int = BINS
  context: int = CONTEXT
  conv_impl: str = "auto"  # auto | xla | banded: how convolutions are computed (same parameters; see ConvBN)

  @property
  def visual(self) -> bool:
    return "visual" in self.modalities


PRESETS = {
  "paper": AVDCNNConfig(),
  # For tests: the paper's layer types and the audio CNN, narrower FC layers.
  "tiny": AVDCNNConfig(hidden=(64, 48)),
  # Wider shared layers (not the paper's): 2,048 + 2,048 sigmoid units.
  "wide": AVDCNNConfig(hidden=(2048, 2048)),
}


def normalize_lips(lips: jnp.ndarray) -> jnp.ndarray:
  """uint8 (or 0-255 float) mouth images `[..., 16, 24, 3]` -> 0-1, then zero mean and unit std per image."""
  x = lips.astype(jnp.float32) / 255.0
  mean = x.mean(axis=(-3, -2, -1), keepdims=True)
  std = x.std(axis=(-3, -2, -1), keepdims=True)
  return (x - mean) / (std + 1e-3)


def lips_layout(lips: jnp.ndarray) -> jnp.ndarray:
  """`[batch, 5, 16, 24, 3]` -> `[batch, 24, 80, 3]`: each image transposed, frames side by side."""
  b, f, h, w, c = lips.shape
  return jnp.transpose(lips, (0, 3, 1, 2, 4)).reshape(b, w, f * h, c)


def early_layout(audio: jnp.ndarray, lips: jnp.ndarray) -> jnp.ndarray:
  """`[batch, 257, 5]` and `[batch, 5, 16, 24, 3]` -> `[batch, 257 + 1152, 5]` (early fusion input)."""
  b, f = lips.shape[:2]
  flat = jnp.swapaxes(lips.reshape(b, f, -1), 1, 2)  # [batch, 1152, 5]
  return jnp.concatenate([audio, flat.astype(audio.dtype)], axis=1)


def _conv_out(shape: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
  return shape[0] - kernel[0] + 1, shape[1] - kernel[1] + 1


def flat_widths(config: AVDCNNConfig) -> dict[str, int]:
  """Flattened width of each CNN's output, derived from the input shapes and VALID kernels."""
  widths = {}

  def audio_cnn(shape):
    for i, (kh, kw, filters) in enumerate(config.audio_convs):
      shape = _conv_out(shape, (kh, kw))
      if i == 0:
        shape = (shape[0] // config.audio_pool[0], shape[1] // config.audio_pool[1])
    return shape[0] * shape[1] * config.audio_convs[-1][2]

  if config.fusion == "early" and config.visual:
    widths["early"] = audio_cnn((config.bins + LIPS_SIZE, config.context))
    return widths
  widths["audio"] = audio_cnn((config.bins, config.context))
  if config.visual:
    shape = (LIPS_SHAPE[1], config.context * LIPS_SHAPE[0])
    for kh, kw, _ in config.visual_convs:
      shape = _conv_out(shape, (kh, kw))
    widths["visual"] = shape[0] * shape[1] * config.visual_convs[-1][2]
  return widths


def banded_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """VALID, stride-1 2-D convolution as `kw` matmuls with banded matrices, equal to
  `lax.conv_general_dilated(x, kernel, (1, 1), "VALID")` in NHWC / HWIO.

  Each input column (all heights and channels, `H*C` values) maps to a whole output column
  (`H'*O` values) through a `[H*C, H'*O]` matrix that holds the kernel's taps on its band, one per
  kernel column. That is `H/kh` times the direct convolution's FLOPs, but as large matmuls: for
  AVDCNN's short visual kernels on CPU, 2-4x faster (with the gradient) than XLA's convolution.
  """
  _, h, w, c = x.shape
  kh, kw, _, o = kernel.shape
  out_h, out_w = h - kh + 1, w - kw + 1
  band = np.zeros((kh, h, out_h), np.float32)  # band[i, r, q] = 1 where input row r = output row q + i
  for i in range(kh):
    band[i, np.arange(out_h) + i, np.arange(out_h)] = 1.0
  matrices = jnp.einsum("irq,ijco->jrcqo", band, kernel.astype(jnp.float32)).reshape(kw, h * c, out_h * o)
  columns = jnp.swapaxes(x, 1, 2).reshape(x.shape[0], w, h * c)  # [batch, W, H*C]
  matrices = matrices.astype(x.dtype)
  out = sum(columns[:, j : j + out_w] @ matrices[j] for j in range(kw))  # [batch, W', H'*O]
  return jnp.swapaxes(out.reshape(x.shape[0], out_w, out_h, o), 1, 2)


def use_banded(height: int, kernel_height: int, impl: str) -> bool:
  """`conv_impl` -> whether a conv over inputs `height` tall uses `banded_conv`: "auto" when it costs at
  most 4x the direct convolution's FLOPs (AVDCNN's visual convs, not its 257-bin audio convs)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={impl!r}: choose one of {', '.join(CONV_IMPLS)}")
  return impl == "banded" or (impl == "auto" and height <= 4 * kernel_height)


def max_pool(x: jnp.ndarray, window: tuple[int, int]) -> jnp.ndarray:
  """Non-overlapping max pooling (stride = window, VALID) of `[batch, H, W, C]`: `nn.max_pool(x, window,
  strides=window)`, but a NaN in a window gives NaN. The window's elements (a reshape) are compared in turn
  and the larger kept by `where`, so the gradient goes to that element, elementwise: cheaper on CPU than
  select-and-scatter, and never NaN, as `.max()`'s can be when XLA recomputes the input (docs/avdcnn.md)."""
  b, h, w, c = x.shape
  ph, pw = window
  x = x[:, : h // ph * ph, : w // pw * pw].reshape(b, h // ph, ph, w // pw, pw, c)
  out, *others = (x[:, :, i, :, j] for i in range(ph) for j in range(pw))
  for other in others:
    out = jnp.where((other > out) | jnp.isnan(other), other, out)
  return out


class _BandedConv(nn.Module):
  """`nn.Conv(filters, kernel, padding="VALID")`'s parameters (same names, shapes and init), applied
  with `banded_conv`."""

  filters: int
  kernel: tuple[int, int]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES)
    kernel = self.param("kernel", init, (*self.kernel, x.shape[-1], self.filters))
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), (self.filters,)
    )
    return banded_conv(x, kernel) + bias


class ConvBN(nn.Module):
  """Conv (VALID, stride 1, linear) -> batch norm. Input and output `[batch, height, width, channels]`.

  `impl`: "xla" (`nn.Conv`), "banded" (`banded_conv`) or "auto" (see `use_banded`); the parameters
  are the same (those of `nn.Conv` named "conv") whichever computes the convolution."""

  filters: int
  kernel: tuple[int, int]
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if use_banded(x.shape[1], self.kernel[0], self.impl):
      x = _BandedConv(self.filters, self.kernel, name="conv")(x)
    else:
      x = nn.Conv(
        self.filters,
        self.kernel,
        padding="VALID",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name="conv",
      )(x)
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.0,  # the returned 'running' statistics are this batch's (population_batch_stats)
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name="bn",
    )(x)


class AudioCNN(nn.Module):
  """conv 12×2 (10) -> max-pool 2×1 -> conv 5×1 (4), flattened. `[batch, bins, context]` -> `[batch, units]`."""

  config: AVDCNNConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x[..., None]
    for i, (kh, kw, filters) in enumerate(self.config.audio_convs):
      x = ConvBN(filters, (kh, kw), self.config.conv_impl, name=f"conv_{i}")(x, train)
      if i == 0:
        x = max_pool(x, self.config.audio_pool)
    return x.reshape(x.shape[0], -1)


class VisualCNN(nn.Module):
  """conv 15×2 (12) -> 7×2 (10) -> 3×2 (6), flattened. `[batch, 24, 80, 3]` -> `[batch, units]`."""

  config: AVDCNNConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    for i, (kh, kw, filters) in enumerate(self.config.visual_convs):
      x = ConvBN(filters, (kh, kw), self.config.conv_impl, name=f"conv_{i}")(x, train)
    return x.reshape(x.shape[0], -1)


class AVDCNN(nn.Module):
  """The AVDCNN / ADCNN / early-fusion network (see the module docstring for inputs and outputs)."""

  config: AVDCNNConfig

  @nn.compact
  def __call__(self, audio: jnp.ndarray, lips: jnp.ndarray | None = None, train: bool = False) -> dict:
    cfg = self.config
    if cfg.visual and lips is None:
      raise ValueError("this AVDCNN sees the lips: pass lips [batch, 5, 16, 24, 3]")
    if cfg.visual and cfg.fusion == "early":
      features = [AudioCNN(cfg, name="early_cnn")(early_layout(audio, lips), train)]
    else:
      features = [AudioCNN(cfg, name="audio_cnn")(audio, train)]
      if cfg.visual:
        features.append(VisualCNN(cfg, name="visual_cnn")(lips_layout(lips), train))
    x = jnp.concatenate(features, axis=-1)
    for i, width in enumerate(cfg.hidden):
      x = nn.sigmoid(dense(width, ("embed", "mlp"), name=f"fc_{i}")(x))
      x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
    centre = audio[:, :, audio.shape[-1] // 2]
    if cfg.head == "plain":
      out = {"audio": dense(cfg.bins, ("mlp", "classes"), name="audio_head")(x)}
    else:  # W = 0 at init: the output starts at (or just below) the noisy centre frame
      head = nn.Dense(
        cfg.bins,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp", "classes")),
        bias_init=nn.with_logical_partitioning(
          nn.initializers.constant(cfg.gain_bias if cfg.head == "gain" else 0.0), ("classes",)
        ),
        name="audio_head",
      )
      correction = head(x)
      if cfg.head == "gain":  # attenuation only: Ŷ = X_t - softplus(W h + b) <= X_t
        out = {"audio": centre - nn.softplus(correction)}
      elif cfg.head == "residual":  # Ŷ = X_t + W h + b
        out = {"audio": centre + correction}
      else:
        raise ValueError(f"head={cfg.head!r}: choose one of {', '.join(HEADS)}")
    if cfg.visual:
      out["visual"] = dense(LIPS_SIZE, ("mlp", "classes"), name="visual_head")(x)
    return out


def model_inputs(batch: dict, config: AVDCNNConfig, dtype=jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """`(audio, lips)` model inputs in `dtype` (the step's compute dtype) from a batch with `audio`
  `[b, 257, 5]` and uint8 `lips` `[b, 5, 16, 24, 3]`."""
  lips = normalize_lips(batch["lips"]).astype(dtype) if config.visual else None
  return batch["audio"].astype(dtype), lips


def lips_target(lips: jnp.ndarray) -> jnp.ndarray:
  """The visual head's target: the normalized centre mouth image of uint8 `lips` `[b, context, 16, 24, 3]`,
  flattened to `[b, 1152]`."""
  centre = lips[:, lips.shape[1] // 2]
  return normalize_lips(centre).reshape(centre.shape[0], -1)


def init_example(config: AVDCNNConfig) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """`(audio, lips)` zero model inputs of one frame, for `init` and shape inference."""
  example = {"audio": np.zeros((1, config.bins, config.context), np.float32)}
  example["lips"] = np.zeros((1, config.context, *LIPS_SHAPE), np.uint8)
  return model_inputs(example, config)


def make_init_params(model: AVDCNN) -> Callable[[jax.Array], Any]:
  """`init_params(rng) -> params` (logically annotated), the trainer's params initialiser."""

  def init_params(rng):
    return model.init({"params": rng}, *init_example(model.config), train=False)["params"]

  return init_params


def batch_stats_shapes(model: AVDCNN) -> Any:
  """The `jax.ShapeDtypeStruct`s of the model's batch-norm statistics (the model state), without
  computing anything."""
  variables = jax.eval_shape(lambda rng: model.init({"params": rng}, *init_example(model.config)), jax.random.key(0))
  return variables["batch_stats"]


def apply_train(model: AVDCNN, params: Any, batch: dict, rng: jax.Array) -> dict:
  """Training forward pass: batch-statistics normalization, dropout; running averages discarded."""
  audio, lips = model_inputs(batch, model.config, floating_dtype(params))
  out, _ = model.apply({"params": params}, audio, lips, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
  return out


def apply_inference(model: AVDCNN, params: Any, batch_stats: Any, batch: dict) -> dict:
  """Inference forward pass with population batch-norm statistics: each row independent of the others."""
  audio, lips = model_inputs(batch, model.config)
  return model.apply({"params": params, "batch_stats": batch_stats}, audio, lips, train=False)


def population_batch_stats(model: AVDCNN, params: Any, batches: Iterable[dict]) -> Any:
  """Population batch-norm statistics ("precise BN") over training `batches` with fixed `params`.

  Each batch runs in training mode (batch statistics, no dropout); per layer the result is the
  mean of the batch means and the pooled variance `mean(var_b + mean_b²) - mean²` (exact for
  equal-sized batches given the earlier layers' batch-mode outputs).
  """

  @jax.jit
  def stats_of(params, batch):
    audio, lips = model_inputs(batch, model.config)
    # dropout (train=True) acts only after the last batch norm, so it cannot change these statistics
    rngs = {"dropout": jax.random.key(0)}
    _, state = model.apply({"params": params}, audio, lips, train=True, rngs=rngs, mutable=["batch_stats"])
    return state["batch_stats"]  # with momentum 0: exactly this batch's means and variances

  total, count = None, 0
  for batch in batches:
    stats = stats_of(params, batch)
    moments = _to_moments(stats)
    total = moments if total is None else jax.tree.map(jnp.add, total, moments)
    count += 1
  if not count:
    raise ValueError("population_batch_stats needs at least one batch")
  return _from_moments(jax.tree.map(lambda x: x / count, total))


def _to_moments(stats: Any) -> Any:
  return _map_bn(stats, lambda mean, var: {"mean": mean, "var": var + mean**2})


def _from_moments(moments: Any) -> Any:
  return _map_bn(moments, lambda mean, second: {"mean": mean, "var": jnp.maximum(second - mean**2, 0.0)})


def _map_bn(tree: Any, fn: Callable[[jnp.ndarray, jnp.ndarray], dict]) -> Any:
  """Applies `fn(mean, var)` to every batch-norm leaf pair of a batch_stats tree."""
  if isinstance(tree, dict) and set(tree) == {"mean", "var"}:
    return fn(tree["mean"], tree["var"])
  return {k: _map_bn(v, fn) for k, v in tree.items()}
