"""Zero-shot classification from class names × prompt templates: ŷ_i = argmax_j softmax_j(I_i · T_j)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_classifier(
  encode_text: Callable[[Sequence[str]], np.ndarray],
  class_names: Sequence[str],
  templates: Sequence[str],
) -> np.ndarray:
  """Class embeddings `[classes, dim]`: for each class, the mean of the normalised embeddings of
  its prompts (every template filled with the class name), normalised again (as CLIP does)."""
  prompts = [t.format(name) for name in class_names for t in templates]
  emb = _normalize(encode_text(prompts)).reshape(len(class_names), len(templates), -1)
  return _normalize(emb.mean(axis=1))


def zero_shot_probabilities(image_emb: np.ndarray, classifier: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
  """softmax_j(scale · I_i · T_j), `[images, classes]`."""
  logits = logit_scale * _normalize(image_emb) @ classifier.T
  return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def zero_shot_accuracy(image_emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of the nearest class embedding."""
  predictions = (_normalize(image_emb) @ classifier.T).argmax(-1)
  return float((predictions == np.asarray(labels)).mean())
