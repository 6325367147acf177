"""CLIP's contrastive losses (softmax/InfoNCE, SigLIP's sigmoid, the basic pairwise loss) and their sharded
forms over the batch axes of a mesh (gathered, and a ring of chunks). Pure jnp and shard_map."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from multimodal_jax import sharding as shd
from multimodal_jax import train
from multimodal_jax.arrays import floating_dtype
from multimodal_jax.losses import softmax_cross_entropy

# --- Contrastive losses (CLIP, SigLIP, pairwise) -------------------------------------------------------------------
#
# `logit_scale` below is the multiplier itself (CLIP's `exp(log_scale)`), not its log; `logit_bias` is SigLIP's `b`.
# All losses compute in float32 whatever the input dtype.


def clip_softmax_loss(image_emb: jnp.ndarray, text_emb: jnp.ndarray, logit_scale: jnp.ndarray) -> jnp.ndarray:
  """CLIP's symmetric InfoNCE loss, a scalar.

  image_emb, text_emb: `[batch, dim]`, already L2-normalized; row i of each is a matching pair.
  logits `[batch, batch]` = logit_scale · image_emb @ text_embᵀ; the loss is the mean of the image→text
  cross-entropy (over rows) and the text→image one (over columns), with labels arange(batch).
  """
  image, text = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  logits = jnp.asarray(logit_scale, jnp.float32) * image @ text.T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (softmax_cross_entropy(logits, labels).mean() + softmax_cross_entropy(logits.T, labels).mean())


def sigmoid_loss(
  image_emb: jnp.ndarray, text_emb: jnp.ndarray, logit_scale: jnp.ndarray, logit_bias: jnp.ndarray
) -> jnp.ndarray:
  """SigLIP's pairwise sigmoid loss, a scalar.

  image_emb, text_emb: `[batch, dim]`, already L2-normalized. With logits z-signed as
  ℓ_ij = logit_scale · I_i·T_j + logit_bias and z_ij = +1 on the diagonal, −1 elsewhere, the loss is
  −(1/batch) Σ_i Σ_j log σ(z_ij ℓ_ij): summed over texts, averaged over images (the SigLIP paper's normalization).
  """
  image, text = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  logits = jnp.asarray(logit_scale, jnp.float32) * image @ text.T + jnp.asarray(logit_bias, jnp.float32)
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  return -jax.nn.log_sigmoid(signs * logits).sum() / logits.shape[0]


def pairwise_contrastive_loss(x_p: jnp.ndarray, x_q: jnp.ndarray, y: jnp.ndarray, margin: float = 1.0) -> jnp.ndarray:
  """The contrastive loss of Hadsell, Chopra & LeCun (2006), a scalar.

  x_p, x_q: `[pairs, dim]` embeddings f(x_p), f(x_q); y: `[pairs]`, 1 for a similar pair, 0 for a dissimilar one.
  With d = ‖x_p − x_q‖₂ the per-pair loss uses the paper's ½ convention:
    ½ d²                   for y = 1,
    ½ max(0, margin − d)²  for y = 0,
  and the result is the mean over pairs. The gradient at d = 0 is 0 (the hinge's subgradient there is
  taken along no direction), so identical dissimilar pairs give no NaN.
  """
  diff = x_p.astype(jnp.float32) - x_q.astype(jnp.float32)
  sq_dist = jnp.sum(diff * diff, axis=-1)
  positive = sq_dist > 0
  dist = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_dist, 1.0)), 0.0)  # NaN-free gradient at d = 0
  y = jnp.asarray(y, jnp.float32)
  per_pair = 0.5 * (y * sq_dist + (1.0 - y) * jnp.square(jnp.maximum(margin - dist, 0.0)))
  return per_pair.mean()


# --- Sharded versions: the global batch split over `axes` of `mesh` ------------------------------------------------
#
# Each takes global `[batch, dim]` arrays (sharded along the batch, as `sharding.batch_sharding` does, or any other
# way: shard_map reshards them) and is meant to be called inside a jitted loss function. Mesh axes of size 1 are
# dropped; when none are left the plain loss runs. The global batch must be divisible by the product of the axes.


def _batch_axes(mesh: jax.sharding.Mesh, axes: tuple[str, ...], batch: int) -> tuple[tuple[str, ...], int]:
  """The mesh axes of size > 1 among `axes`, and their product; raises if `batch` does not split evenly."""
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"axes {unknown} are not in the mesh, whose axes are {tuple(mesh.shape)}")
  used = tuple(a for a in axes if mesh.shape[a] > 1)
  n = 1
  for a in used:
    n *= mesh.shape[a]
  if batch % n:
    raise ValueError(f"global batch {batch} is not divisible by the {n} devices of mesh axes {used}")
  return used, n


def _shard_batch(fn, mesh, axes: tuple[str, ...], n_scalars: int):
  """shard_map of `fn(image [b, dim], text [b, dim], *scalars) -> scalar` with the batch split over `axes`."""
  P = jax.sharding.PartitionSpec
  row = P(axes, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(row, row) + (P(),) * n_scalars, out_specs=P())


def _ring_shift(x, axes: tuple[str, ...], n: int):
  """Every device passes `x` (a pytree) to the previous one along `axes`: device i then holds what i+1 had."""
  return jax.lax.ppermute(x, axes, perm=[(j, (j - 1) % n) for j in range(n)])


def clip_softmax_loss_gathered(
  image_emb: jnp.ndarray,
  text_emb: jnp.ndarray,
  logit_scale: jnp.ndarray,
  mesh: jax.sharding.Mesh,
  axes: tuple[str, ...] = ("data", "fsdp"),
) -> jnp.ndarray:
  """`clip_softmax_loss` of global `[batch, dim]` features split over `axes`: open_clip's local_loss + gather_with_grad.

  Each device all-gathers both feature matrices (`[batch, dim]`, differentiably), computes its own rows of the
  image→text logits and of the text→image logits (`[batch/n, batch]` each) against all negatives, and the
  per-row cross-entropies are summed over devices and divided by 2·batch. Per device: O(batch·dim + batch²/n).
  """
  used, n = _batch_axes(mesh, tuple(axes), image_emb.shape[0])
  if not used:
    return clip_softmax_loss(image_emb, text_emb, logit_scale)

  def local(image, text, scale):
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    b = image.shape[0]
    all_image = jax.lax.all_gather(image, used, tiled=True)
    all_text = jax.lax.all_gather(text, used, tiled=True)
    labels = jax.lax.axis_index(used) * b + jnp.arange(b)
    scale = scale.astype(jnp.float32)
    image_to_text = softmax_cross_entropy(scale * image @ all_text.T, labels)
    text_to_image = softmax_cross_entropy(scale * text @ all_image.T, labels)
    return jax.lax.psum(image_to_text.sum() + text_to_image.sum(), used) / (2 * b * n)

  return _shard_batch(local, mesh, used, 1)(image_emb, text_emb, jnp.asarray(logit_scale))


def sigmoid_loss_gathered(
  image_emb: jnp.ndarray,
  text_emb: jnp.ndarray,
  logit_scale: jnp.ndarray,
  logit_bias: jnp.ndarray,
  mesh: jax.sharding.Mesh,
  axes: tuple[str, ...] = ("data", "fsdp"),
) -> jnp.ndarray:
  """`sigmoid_loss` of global `[batch, dim]` features split over `axes`, all-gathering the texts.

  The sigmoid loss is one sum over all (image, text) pairs, so each device all-gathers the texts only and sums
  its `[batch/n, batch]` block of pair terms (its image rows; the text→image view is the same terms); the sums
  are added over devices and divided by batch.
  """
  used, n = _batch_axes(mesh, tuple(axes), image_emb.shape[0])
  if not used:
    return sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias)

  def local(image, text, scale, bias):
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    b = image.shape[0]
    all_text = jax.lax.all_gather(text, used, tiled=True)
    logits = scale.astype(jnp.float32) * image @ all_text.T + bias.astype(jnp.float32)
    columns = jnp.arange(b * n)[None, :]
    rows = jax.lax.axis_index(used) * b + jnp.arange(b)[:, None]
    signs = jnp.where(rows == columns, 1.0, -1.0)
    return jax.lax.psum(-jax.nn.log_sigmoid(signs * logits).sum(), used) / (b * n)

  return _shard_batch(local, mesh, used, 2)(image_emb, text_emb, jnp.asarray(logit_scale), jnp.asarray(logit_bias))


# Ring ("chunked") versions. Device i keeps its own images; the text blocks travel round the ring, so at step k it
# holds the texts of device i+k. Nothing of size [batch, dim] or [batch, batch] exists on any device, in the forward
# pass or the backward: each loss is a custom_vjp whose backward pass runs the ring again, recomputing each
# [b, b] block of logits and sending each text block's gradient along with it, home after the last step.


def _softmax_ring_stats(image, text, scale, axes, n):
  """Per-device pass of the ring: logsumexp over all texts of each local image row `[b]`, logsumexp over all
  images of each local text column `[b]`, and the positive logits `[b]`."""
  logits = scale * image @ text.T
  positives = jnp.diagonal(logits)
  row_lse = jax.nn.logsumexp(logits, axis=1)
  col_lse = jax.nn.logsumexp(logits, axis=0)  # travels with its text block, collecting the other devices' images

  def step(_, carry):
    text_block, col_block, row_lse = _ring_shift(carry[:2], axes, n) + (carry[2],)
    logits = scale * image @ text_block.T
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    col_block = jnp.logaddexp(col_block, jax.nn.logsumexp(logits, axis=0))
    return text_block, col_block, row_lse

  _, col_block, row_lse = jax.lax.fori_loop(1, n, step, (text, col_lse, row_lse))
  return row_lse, _ring_shift(col_block, axes, n), positives


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _softmax_ring(image, text, scale, axes, n):
  """This device's share of the ring softmax loss: Σ_rows (row_lse − pos) + Σ_cols (col_lse − pos), a scalar."""
  return _softmax_ring_fwd(image, text, scale, axes, n)[0]


def _softmax_ring_fwd(image, text, scale, axes, n):
  row_lse, col_lse, positives = _softmax_ring_stats(image, text, scale, axes, n)
  loss = (row_lse - positives).sum() + (col_lse - positives).sum()
  return loss, (image, text, scale, row_lse, col_lse)


def _softmax_ring_bwd(axes, n, residuals, g):
  """Second ring: d(loss)/d logits_rc = g_r·softmax_row(r, c) + g_c·softmax_col(r, c) − 2g·δ_rc, where g_c is the
  cotangent of the device owning text c (it travels with the text block), contracted one `[b, b]` block at a time."""
  image, text, scale, row_lse, col_lse = residuals
  b = image.shape[0]

  def block(text_block, col_block, g_block, d_image, d_text_block, d_scale, diagonal):
    raw = image @ text_block.T
    logits = scale * raw
    grad = g * jnp.exp(logits - row_lse[:, None]) + g_block * jnp.exp(logits - col_block[None, :]) - diagonal
    return d_image + scale * grad @ text_block, d_text_block + scale * grad.T @ image, d_scale + jnp.sum(grad * raw)

  zeros = jnp.zeros_like(image), jnp.zeros_like(text), jnp.zeros_like(scale)
  d_image, d_text, d_scale = block(text, col_lse, g, *zeros, 2 * g * jnp.eye(b, dtype=image.dtype))

  def step(_, carry):
    text_block, col_block, g_block, d_text_block, d_image, d_scale = carry
    text_block, col_block, g_block, d_text_block = _ring_shift((text_block, col_block, g_block, d_text_block), axes, n)
    d_image, d_text_block, d_scale = block(text_block, col_block, g_block, d_image, d_text_block, d_scale, 0.0)
    return text_block, col_block, g_block, d_text_block, d_image, d_scale

  *_, d_text, d_image, d_scale = jax.lax.fori_loop(1, n, step, (text, col_lse, g, d_text, d_image, d_scale))
  return d_image, _ring_shift(d_text, axes, n), jax.lax.psum(d_scale, axes)


_softmax_ring.defvjp(_softmax_ring_fwd, _softmax_ring_bwd)


def _sigmoid_ring_sum(image, text, scale, bias, axes, n):
  """This device's share of the ring sigmoid loss: Σ over its image rows and all texts of −log σ(z·ℓ), a scalar."""
  b = image.shape[0]
  signs = 2.0 * jnp.eye(b, dtype=image.dtype) - 1.0
  total = -jax.nn.log_sigmoid(signs * (scale * image @ text.T + bias)).sum()

  def step(_, carry):
    text_block, total = _ring_shift(carry[0], axes, n), carry[1]
    return text_block, total - jax.nn.log_sigmoid(-(scale * image @ text_block.T + bias)).sum()

  return jax.lax.fori_loop(1, n, step, (text, total))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sigmoid_ring(image, text, scale, bias, axes, n):
  return _sigmoid_ring_sum(image, text, scale, bias, axes, n)


def _sigmoid_ring_fwd(image, text, scale, bias, axes, n):
  return _sigmoid_ring_sum(image, text, scale, bias, axes, n), (image, text, scale, bias)


def _sigmoid_ring_bwd(axes, n, residuals, g):
  """Second ring: d(−log σ(zℓ))/dℓ = −z·σ(−zℓ); the text gradients travel with their blocks and come home."""
  image, text, scale, bias = residuals
  b = image.shape[0]

  def block(text_block, signs, d_image, d_text_block, d_scale, d_bias):
    raw = image @ text_block.T
    grad = -g * signs * jax.nn.sigmoid(-signs * (scale * raw + bias))
    return (
      d_image + scale * grad @ text_block,
      d_text_block + scale * grad.T @ image,
      d_scale + jnp.sum(grad * raw),
      d_bias + jnp.sum(grad),
    )

  zeros = jnp.zeros_like(image), jnp.zeros_like(text), jnp.zeros_like(scale), jnp.zeros_like(bias)
  d_image, d_text, d_scale, d_bias = block(text, 2.0 * jnp.eye(b, dtype=image.dtype) - 1.0, *zeros)

  def step(_, carry):
    text_block, d_text_block, d_image, d_scale, d_bias = carry
    text_block, d_text_block = _ring_shift((text_block, d_text_block), axes, n)
    d_image, d_text_block, d_scale, d_bias = block(text_block, -1.0, d_image, d_text_block, d_scale, d_bias)
    return text_block, d_text_block, d_image, d_scale, d_bias

  *_, d_text, d_image, d_scale, d_bias = jax.lax.fori_loop(1, n, step, (text, d_text, d_image, d_scale, d_bias))
  return d_image, _ring_shift(d_text, axes, n), jax.lax.psum(d_scale, axes), jax.lax.psum(d_bias, axes)


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def clip_softmax_loss_chunked(
  image_emb: jnp.ndarray,
  text_emb: jnp.ndarray,
  logit_scale: jnp.ndarray,
  mesh: jax.sharding.Mesh,
  axes: tuple[str, ...] = ("data", "fsdp"),
) -> jnp.ndarray:
  """`clip_softmax_loss` of global `[batch, dim]` features split over `axes`, by a ring of `n` devices.

  Text blocks `[batch/n, dim]` are passed round the ring with ppermute (n − 1 steps of a fori_loop); each device
  keeps a streaming logsumexp for its image rows, and a streaming logsumexp for each text column travels with its
  text block and comes home at the end. The backward pass (a custom_vjp) runs the ring again. Per device:
  O(batch/n · dim + (batch/n)²) memory; no all-gather.
  """
  used, n = _batch_axes(mesh, tuple(axes), image_emb.shape[0])
  if not used:
    return clip_softmax_loss(image_emb, text_emb, logit_scale)

  def local(image, text, scale):
    share = _softmax_ring(image.astype(jnp.float32), text.astype(jnp.float32), scale.astype(jnp.float32), used, n)
    return jax.lax.psum(share, used) / (2 * image.shape[0] * n)

  return _shard_batch(local, mesh, used, 1)(image_emb, text_emb, jnp.asarray(logit_scale))


def sigmoid_loss_chunked(
  image_emb: jnp.ndarray,
  text_emb: jnp.ndarray,
  logit_scale: jnp.ndarray,
  logit_bias: jnp.ndarray,
  mesh: jax.sharding.Mesh,
  axes: tuple[str, ...] = ("data", "fsdp"),
) -> jnp.ndarray:
  """`sigmoid_loss` of global `[batch, dim]` features split over `axes`, by a ring of `n` devices (SigLIP's chunked
  loss): text blocks `[batch/n, dim]` are passed round with ppermute and each device sums its `[batch/n, batch/n]`
  block of pair terms per step; the backward pass (a custom_vjp) runs the ring again. No all-gather.
  """
  used, n = _batch_axes(mesh, tuple(axes), image_emb.shape[0])
  if not used:
    return sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias)

  def local(image, text, scale, bias):
    f32 = jnp.float32
    share = _sigmoid_ring(image.astype(f32), text.astype(f32), scale.astype(f32), bias.astype(f32), used, n)
    return jax.lax.psum(share, used) / (image.shape[0] * n)

  return _shard_batch(local, mesh, used, 2)(image_emb, text_emb, jnp.asarray(logit_scale), jnp.asarray(logit_bias))


def logit_scale_and_bias(config, params) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """The logit scale (exp of the param, clamped at `max_logit_scale`) and bias (None without one) of
  a `ClipConfig`'s params, as `CLIP.__call__` returns them, from the params alone (no images)."""
  scale = jnp.minimum(jnp.exp(params["logit_scale"]), config.max_logit_scale)
  return scale, params["logit_bias"] if config.init_logit_bias is not None else None


def make_loss_fn(model, config, mesh, normalize) -> train.EmbeddingLoss:
  """The contrastive loss of a batch `{"image": uint8, "text": ids}` (images normalized by `normalize`, the
  run's `ClipSettings.normalizer()`, and randomly shifted), as a `train.EmbeddingLoss`.

  `embed` gives the L2-normalized image and text embeddings `{"image", "text"}` `[b, embed_dim]`;
  `loss_from_embeddings` the softmax or sigmoid loss (`config.loss`, `config.loss_impl`) of all of
  them with the params' logit scale (and bias). So with `grad_accum_steps > 1` the trainer trains
  the loss of the whole batch, every example a negative of every other, as without accumulation
  (open_clip's `--accum-freq`), and not the mean of each microbatch's own loss.
  """
  axes = shd.BATCH_AXES

  def contrastive(img, txt, scale, bias):
    if config.loss == "softmax":
      fn = clip_softmax_loss_gathered if config.loss_impl == "gather" else clip_softmax_loss_chunked
      return fn(img, txt, scale, mesh, axes)
    fn = sigmoid_loss_gathered if config.loss_impl == "gather" else sigmoid_loss_chunked
    return fn(img, txt, scale, bias, mesh, axes)

  def embed(params, batch, rng):
    # Images enter in the params' dtype (the step's compute dtype): float32 pixels would promote every
    # activation and matmul of the image tower to float32 in a bfloat16 step.
    images = normalize(batch["image"], rng, config.augment_shift).astype(floating_dtype(params))
    img, txt, _, _ = model.apply({"params": params}, images, batch["text"])
    return {"image": img, "text": txt}

  def loss_from_embeddings(params, embeddings):
    scale, bias = logit_scale_and_bias(model.config, params)
    loss = contrastive(embeddings["image"].astype(jnp.float32), embeddings["text"].astype(jnp.float32), scale, bias)
    return loss, {"logit_scale": scale}

  return train.EmbeddingLoss(embed, loss_from_embeddings)
