"""AVDCNN's multi-task loss and the compressed-magnitude target. Pure jnp."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.layers import checkpointed

# --- AVDCNN ---------------------------------------------------------------------------------------------------------


def avdcnn_loss(
  audio_pred: jnp.ndarray,
  audio_target: jnp.ndarray,
  visual_pred: jnp.ndarray | None = None,
  visual_target: jnp.ndarray | None = None,
  mu: float = 1.0,
  under_weight: float = 1.0,
) -> tuple[jnp.ndarray, dict]:
  """AVDCNN's multi-task loss `(1/K) Σ_k (‖Ŷ_k − Y_k‖² + μ ‖X̂_V,k − X_V,k‖²)` over the K frames of a batch.

  `audio_*` `[K, bins]` (enhanced vs clean log-power frames), `visual_*` `[K, pixels]` (reconstructed
  vs input mouth image; None for the audio-only model). Squared norms are summed over each frame's
  values and averaged over frames, in float32. `under_weight` (1: the paper's loss) multiplies the
  squared audio errors where Ŷ < Y (over-suppression). Returns `(loss, {"audio_loss", "visual_loss"})`.
  """
  error = audio_pred.astype(jnp.float32) - audio_target.astype(jnp.float32)
  weight = jnp.where(error < 0, under_weight, 1.0) if under_weight != 1.0 else 1.0
  audio = jnp.sum(weight * error**2, axis=-1).mean()
  parts = {"audio_loss": audio}
  loss = audio
  if visual_pred is not None:
    visual = jnp.sum((visual_pred.astype(jnp.float32) - visual_target.astype(jnp.float32)) ** 2, axis=-1).mean()
    parts["visual_loss"] = visual
    loss = loss + mu * visual
  return loss, parts


COMPRESSION = 0.3  # compressed_magnitude: |S|^0.3
COMPRESSED_SCALE = 50.0  # so that the compressed loss is of the log-power loss's order (and mu keeps its meaning)


def compressed_magnitude(
  normalized: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray, compression: float = COMPRESSION
) -> jnp.ndarray:
  """`sqrt(COMPRESSED_SCALE) * |S|^compression` of normalized log-power frames `[b, bins]` with their
  utterances' statistics `[b, bins]` (`log|S|^2 = normalized * std + mean`).

  AVDCNN's `loss="compressed"` is `avdcnn_loss` of these instead of the normalized log power: the
  squared error of power-law compressed magnitudes weighs loud time-frequency bins (speech, and the
  noise over it) more than near-silent ones, with the same model and outputs.
  """
  return np.sqrt(COMPRESSED_SCALE) * jnp.exp(0.5 * compression * (normalized * std + mean))


def make_loss_fn(
  model: avdcnn.AVDCNN, mu: float, under_weight: float = 1.0, loss: str = "log_power", remat: str = "none"
):
  """`avdcnn_loss` of the normalized log-power frames (the paper's) or their compressed magnitudes."""

  forward = checkpointed(lambda params, batch, rng: avdcnn.apply_train(model, params, batch, rng), remat)

  def loss_fn(params, batch, rng):
    out = forward(params, batch, rng)
    visual_target = avdcnn.lips_target(batch["lips"]) if model.config.visual else None
    prediction, target = out["audio"], batch["target"]
    if loss == "compressed":
      prediction = compressed_magnitude(prediction, batch["mean"], batch["std"])
      target = compressed_magnitude(target, batch["mean"], batch["std"])
    return avdcnn_loss(prediction, target, out.get("visual"), visual_target, mu, under_weight)

  return loss_fn
