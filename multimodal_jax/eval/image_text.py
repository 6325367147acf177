"""Scores of a trained image-text (CLIP-style) model on a captioned image set whose captions describe a
class: zero-shot accuracy with held-out and with training prompt templates, image <-> text recall@k
among the distinct captions, and a linear probe on the image embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from multimodal_jax import sharding as shd
from multimodal_jax.data.pipeline import eval_batches
from multimodal_jax.eval.linear_probe import linear_probe_accuracy
from multimodal_jax.eval.retrieval import recall_at_k
from multimodal_jax.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier

Split = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]


def encode_split(
  encode: Callable[[dict], tuple[jax.Array, jax.Array]],
  source: Any,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  transform: Callable[[dict], dict],
) -> Split:
  """`(image embeddings, caption embeddings, labels, captions)` of a whole split, in order.

  `encode(global_batch) -> (image embeddings, text embeddings)` runs on global batches of
  `batch_size` records (`transform` applied to each record; the last batch padded, its padding
  dropped from the result). Records have 'caption' (str) and 'label'."""
  imgs, txts, labels = [], [], []
  captions = [source[i]["caption"] for i in range(len(source))]
  for batch in eval_batches(source, batch_size, transform=transform):
    mask = batch.pop("mask").astype(bool)
    i, t = jax.device_get(encode(shd.host_to_global_batch(batch, mesh)))
    imgs.append(np.asarray(i)[mask])
    txts.append(np.asarray(t)[mask])
    labels.append(batch["label"][mask])
  return np.concatenate(imgs), np.concatenate(txts), np.concatenate(labels), captions


def image_text_scores(
  encode_split: Callable[[str], Split],
  encode_texts: Callable[[Sequence[str]], np.ndarray],
  class_names: Sequence[str],
  held_out_templates: Sequence[str],
  train_templates: Sequence[str],
) -> dict[str, float]:
  """The scores of a model given `encode_split(split_name) -> Split` ("test" and "train") and
  `encode_texts(texts) -> [n, d]`.

  Captions describe a digit, not one image, and repeat: retrieval ranks the distinct test captions,
  a caption matching every image of its class. The linear probe fits on every second training image."""
  img, txt, labels, captions = encode_split("test")
  _, first = np.unique(captions, return_index=True)
  held_out = zero_shot_classifier(encode_texts, class_names, held_out_templates)
  seen = zero_shot_classifier(encode_texts, class_names, train_templates)
  train_img, _, train_labels, _ = encode_split("train")
  return {
    "zero_shot_accuracy": zero_shot_accuracy(img, held_out, labels),
    "zero_shot_accuracy_train_templates": zero_shot_accuracy(img, seen, labels),
    **recall_at_k(img, txt[first], ks=(1, 5, 10), image_labels=labels, text_labels=labels[first]),
    "linear_probe_accuracy": linear_probe_accuracy(train_img[::2], train_labels[::2], img, labels, len(class_names)),
  }
