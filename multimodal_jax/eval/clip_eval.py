"""Zero-shot classification and retrieval of a CLIP-style model on any evaluation set, and the
per-image predictions file.

`evaluate_set` scores a set whose records have an image and a label (zero-shot accuracy over class
names x templates) and/or a caption (image <-> text recall@k among the distinct captions, each
image matching its own caption). `zero_shot_predictions` gives, per image, the predicted class and
its probability (softmax over the classes of `logit_scale * cosine similarity`, as CLIP's zero-shot
classifier); `write_predictions` writes them as WORKDIR/predictions.jsonl, one JSON line per image
(`index`, `path` when the set has files, `label`, `prediction`, `probability`), atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from multimodal_jax import files
from multimodal_jax import sharding as shd
from multimodal_jax.arrays import l2_normalize
from multimodal_jax.data.pipeline import eval_batches
from multimodal_jax.eval.retrieval import recall_at_k
from multimodal_jax.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier

PREDICTIONS = "predictions.jsonl"


def encode_images(
  encode: Callable[[dict], jax.Array],
  source: Any,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  transform: Callable[[dict], dict],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Image embeddings `[n, d]` of every record of `source` in order, and the other fields of the
  transformed records (e.g. `label`) stacked `[n, ...]`. `encode(global batch) -> [batch, d]`."""
  embeddings, others = [], {}
  for batch in eval_batches(source, batch_size, transform=transform):
    mask = batch.pop("mask").astype(bool)
    emb = jax.device_get(encode(shd.host_to_global_batch({"image": batch["image"]}, mesh)))
    embeddings.append(np.asarray(emb)[mask])
    for key, value in batch.items():
      if key != "image":
        others.setdefault(key, []).append(np.asarray(value)[mask])
  return np.concatenate(embeddings), {k: np.concatenate(v) for k, v in others.items()}


def batched_texts(encode: Callable[[np.ndarray], Any], rows: int) -> Callable[[Sequence[Any]], np.ndarray]:
  """`encode(inputs [rows, ...]) -> [rows, d]` applied to any number of text inputs in chunks of
  `rows` (the last one padded), so that the model compiles once whatever the number of prompts."""

  def encode_all(inputs) -> np.ndarray:
    inputs = np.asarray(inputs)
    out = []
    for start in range(0, len(inputs), rows):
      chunk = inputs[start : start + rows]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], rows - len(chunk), axis=0)]) if len(chunk) < rows else chunk
      out.append(np.asarray(jax.device_get(encode(padded)))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  return encode_all


def zero_shot_predictions(
  image_emb: np.ndarray, classifier: np.ndarray, logit_scale: float
) -> tuple[np.ndarray, np.ndarray]:
  """(predicted class `[n]`, its probability `[n]`) from image embeddings and class embeddings."""
  logits = float(logit_scale) * (l2_normalize(np.asarray(image_emb, np.float32)) @ classifier.T)
  logits = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=1, keepdims=True)
  prediction = probs.argmax(axis=1)
  return prediction, probs[np.arange(len(probs)), prediction]


def prediction_rows(
  labels: np.ndarray, prediction: np.ndarray, probability: np.ndarray, paths: Sequence[str] | None = None
) -> list[dict]:
  """One dict per image: index, path (when known), label, prediction, probability."""
  rows = []
  for i, (label, pred, prob) in enumerate(zip(labels, prediction, probability, strict=True)):
    row: dict[str, Any] = {"index": i}
    if paths is not None:
      row["path"] = paths[i]
    row.update(label=int(label), prediction=int(pred), probability=float(prob))
    rows.append(row)
  return rows


def write_predictions(workdir: str, rows: Sequence[dict]) -> str:
  """WORKDIR/predictions.jsonl (written whole, atomically); on process 0 only. Returns its path."""
  path = os.path.join(workdir, PREDICTIONS) if "://" not in workdir else f"{workdir}/{PREDICTIONS}"
  if jax.process_index() == 0:
    files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
  return path


def evaluate_set(
  image_emb: np.ndarray,
  encode_texts: Callable[[Sequence[str]], np.ndarray],
  logit_scale: float,
  *,
  labels: np.ndarray | None = None,
  class_names: Sequence[str] | None = None,
  templates: Sequence[str] = (),
  captions: Sequence[str] | None = None,
  paths: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
  """(scores, prediction rows) of one evaluation set: zero-shot accuracy (top-1 and, with more than
  5 classes, top-5) when it has labels, recall@1/5/10 both ways when it has captions."""
  scores: dict[str, float] = {"num_images": float(len(image_emb))}
  rows: list[dict] = []
  if labels is not None and class_names:
    classifier = zero_shot_classifier(encode_texts, class_names, templates)
    scores["zero_shot_accuracy"] = zero_shot_accuracy(image_emb, classifier, labels)
    if len(class_names) > 5:
      sims = l2_normalize(np.asarray(image_emb, np.float32)) @ classifier.T
      top5 = np.argsort(-sims, axis=1, kind="stable")[:, :5]
      scores["zero_shot_top5_accuracy"] = float((top5 == np.asarray(labels)[:, None]).any(axis=1).mean())
    prediction, probability = zero_shot_predictions(image_emb, classifier, logit_scale)
    rows = prediction_rows(labels, prediction, probability, paths)
  if captions is not None:
    distinct, caption_of_image = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    text_emb = encode_texts(list(distinct))
    scores.update(
      recall_at_k(
        image_emb, text_emb, ks=(1, 5, 10), image_labels=caption_of_image, text_labels=np.arange(len(distinct))
      )
    )
  return scores, rows
