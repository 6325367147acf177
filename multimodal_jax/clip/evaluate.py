"""Zero-shot classification and retrieval of a CLIP-style model on any evaluation set, and the
per-image predictions file.

`evaluate_set` scores a set whose records have an image and a label (zero-shot accuracy over class
names x templates) and/or a caption (image <-> text recall@k among the distinct captions, each
image matching its own caption). `zero_shot_predictions` gives, per image, the predicted class and
its probability (softmax over the classes of `logit_scale * cosine similarity`, as CLIP's zero-shot
classifier); `write_predictions` writes them as WORKDIR/predictions.jsonl, one JSON line per image
(`index`, `path` when the set has files, `label`, `prediction`, `probability`), atomically.

The embedded captioned digits are scored by `evaluate_captioned` (zero-shot accuracy with held-out and
with training templates, recall@k among the distinct captions, a linear probe on the image embeddings);
`evaluate` picks the scorer for a run's config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import files
from multimodal_jax import sharding as shd
from multimodal_jax.arrays import l2_normalize
from multimodal_jax.clip import data as cdata
from multimodal_jax.data.pipeline import eval_batches, load_on_every_process
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.eval.retrieval import recall_at_k
from multimodal_jax.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier

PREDICTIONS = "predictions.jsonl"
from multimodal_jax.eval.linear_probe import linear_probe_accuracy


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


def evaluate(model, params, config, settings, mesh, text_inputs, normalize, workdir: str | None = None) -> dict:
  """Zero-shot and retrieval scores of the run's eval set (the embedded digits' test split, with
  the linear probe as before, or `--config.eval_dataset`); with `workdir`, its predictions.jsonl.
  `settings`: the run's `ClipSettings` (image size, channels, templates); `config` its eval keys."""
  size, chans = settings.image_size, settings.channels
  encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))
  scale = float(jnp.minimum(jnp.exp(params["logit_scale"]), model.config.max_logit_scale))
  if not config.eval_dataset or config.eval_dataset in cdata.EMBEDDED:
    encode = jax.jit(lambda p, b: model.apply({"params": p}, normalize(b["image"]), b["text"])[:2])
    data = load_on_every_process(lambda: cd.load(config.data_dir or None))
    transform = cdata.make_transform(text_inputs, size, chans)
    # The linear probe fits on every second training record (4,000 of the 8,000 pairs): only those are encoded.
    sources = {"test": data["test"], "train": grain.MapDataset.source(data["train"])[::2]}
    splits = {
      s: encode_split(lambda b: encode(params, b), source, config.eval_batch_size, mesh, transform)
      for s, source in sources.items()
    }
    encode_texts = lambda texts: np.asarray(encode_text(params, jnp.asarray(text_inputs(texts))))
    templates = settings.zero_shot_templates(digits=True)
    scores = image_text_scores(splits.get, encode_texts, cd.CLASS_NAMES, templates, cd.TRAIN_TEMPLATES)
    classifier = zero_shot_classifier(encode_texts, cd.CLASS_NAMES, templates)
    img, _, labels, _ = splits["test"]
    rows = prediction_rows(labels, *zero_shot_predictions(img, classifier, scale))
  else:
    source, class_names, paths, fields = cdata.eval_source(config, settings.data)
    encode = jax.jit(lambda p, b: model.apply({"params": p}, normalize(b["image"]), method=model.encode_image))

    def transform(record):
      return {"image": record["image"], **({"label": record["label"]} if "label" in fields else {})}

    img, others = encode_images(lambda b: encode(params, b), source, config.eval_batch_size, mesh, transform)
    texts = batched_texts(lambda t: encode_text(params, jnp.asarray(t)), config.eval_batch_size)
    captions = [source[i]["text"] for i in range(len(source))] if "text" in fields else None
    scores, rows = evaluate_set(
      img,
      lambda strings: texts(text_inputs(strings)),
      scale,
      labels=others.get("label"),
      class_names=class_names,
      templates=settings.zero_shot_templates(digits=False),
      captions=captions,
      paths=paths,
    )
  if workdir is not None and rows:
    write_predictions(workdir, rows)
  return scores


Split = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]  # image and caption embeddings, labels, captions


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
  a caption matching every image of its class. The linear probe fits on the "train" split given (`evaluate`
  gives every second training record)."""
  img, txt, labels, captions = encode_split("test")
  _, first = np.unique(captions, return_index=True)
  held_out = zero_shot_classifier(encode_texts, class_names, held_out_templates)
  seen = zero_shot_classifier(encode_texts, class_names, train_templates)
  train_img, _, train_labels, _ = encode_split("train")
  return {
    "zero_shot_accuracy": zero_shot_accuracy(img, held_out, labels),
    "zero_shot_accuracy_train_templates": zero_shot_accuracy(img, seen, labels),
    **recall_at_k(img, txt[first], ks=(1, 5, 10), image_labels=labels, text_labels=labels[first]),
    "linear_probe_accuracy": linear_probe_accuracy(train_img, train_labels, img, labels, len(class_names)),
  }
