"""Image-text retrieval recall@k in both directions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from multimodal_jax.arrays import l2_normalize


def recall_at_k(
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  ks: Sequence[int] = (1, 5, 10),
  image_labels: np.ndarray | None = None,
  text_labels: np.ndarray | None = None,
) -> dict[str, float]:
  """Recall@k for `[n_images, d]` images and `[n_texts, d]` texts (cosine similarity).

  By default text t describes image t (one caption per image) and only that pair is a match.
  With `image_labels [n_images]` and `text_labels [n_texts]`, a text matches every image with the
  same label (for captions that describe a class rather than one image). image→text counts a hit
  when a matching text is in the image's top k; text→image when a matching image is in the
  text's top k.
  """
  img = l2_normalize(np.asarray(image_emb, np.float32))
  txt = l2_normalize(np.asarray(text_emb, np.float32))
  if image_labels is None:
    if len(img) != len(txt):
      raise ValueError(f"{len(img)} images and {len(txt)} texts: pass labels when they are not paired one to one")
    image_labels = text_labels = np.arange(len(img))
  match = np.asarray(image_labels)[:, None] == np.asarray(text_labels)[None, :]  # [images, texts]
  sim = img @ txt.T
  text_rank = np.argsort(-sim, axis=1, kind="stable")  # per image, texts best first
  image_rank = np.argsort(-sim.T, axis=1, kind="stable")  # per text, images best first
  out = {}
  for k in ks:
    i2t = np.take_along_axis(match, text_rank[:, :k], axis=1).any(axis=1).mean()
    t2i = np.take_along_axis(match.T, image_rank[:, :k], axis=1).any(axis=1).mean()
    out[f"image_to_text_recall@{k}"] = float(i2t)
    out[f"text_to_image_recall@{k}"] = float(t2i)
  return out
