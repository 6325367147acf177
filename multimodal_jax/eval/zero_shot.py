"""Zero-shot classification from class names × prompt templates: ŷ_i = argmax_j (I_i · T_j)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from multimodal_jax.arrays import l2_normalize


def zero_shot_classifier(
  encode_text: Callable[[Sequence[str]], np.ndarray],
  class_names: Sequence[str],
  templates: Sequence[str],
) -> np.ndarray:
  """Class embeddings `[classes, dim]`: for each class, the mean of the normalized embeddings of
  its prompts (every template filled with the class name), normalized again (as CLIP does)."""
  prompts = [t.format(name) for name in class_names for t in templates]
  emb = l2_normalize(np.asarray(encode_text(prompts), np.float32)).reshape(len(class_names), len(templates), -1)
  return l2_normalize(emb.mean(axis=1))


def zero_shot_accuracy(image_emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of the nearest class embedding."""
  predictions = (l2_normalize(np.asarray(image_emb, np.float32)) @ classifier.T).argmax(-1)
  return float((predictions == np.asarray(labels)).mean())
