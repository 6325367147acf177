"""CLIP: contrastive image-text training, zero-shot evaluation, retrieval; weights in and out.

  python -m experiments.clip --workdir /tmp/clip                  # train (resumes if DIR has a checkpoint)
  python -m experiments.clip --workdir /tmp/clip --mode=eval      # zero-shot + retrieval from the checkpoint
  python -m experiments.clip --workdir W --config.dataset=csv:PAIRS.tsv --config.image_size=32   # your pairs
  python -m experiments.clip --workdir W --mode=eval --config.init_from=open_clip:M.safetensors \\
      --config.eval_dataset=folder:DIR --config.templates=openai   # an imported model, no training
  python -m experiments.clip --workdir /tmp/clip --mode=export --config.export_to=open_clip:OUT.safetensors

Keys: dataset (captioned_digits, csv:, tfds:), eval_dataset (folder:, tfds:, csv:), tokenizer=words|clip_bpe|
hf:PATH, templates=openai|FILE, loss=softmax|sigmoid, loss_impl=gather|chunked, image_tower=vit|resnet,
text_tower=clip|minilm, model (a preset of multimodal_jax.models.clip, or init_from), init_from, freeze=image|
text|REGEX, mesh. Empty keys resolve in multimodal_jax.clip_data. Evaluation of the embedded digits
(multimodal_jax.eval.image_text): zero-shot accuracy with held-out templates, retrieval recall@k among the
distinct test captions, a linear probe; of other sets multimodal_jax.eval.clip_eval; both write
WORKDIR/predictions.jsonl. Results: README.md and docs/results/clip.md.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import ml_collections

from multimodal_jax import cli, clip_run, clip_weights, loop, losses, train
from multimodal_jax import clip_data as cdata
from multimodal_jax import sharding as shd
from multimodal_jax.attention import ATTENTION_IMPLEMENTATIONS
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, one_of
from multimodal_jax.data import specs
from multimodal_jax.data.pipeline import GrainBatches, worker_count
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.models import clip as clip_model

EVAL_KEYS = ("mesh", "data_dir", "eval_batch_size", "eval_dataset", "templates", "export_to", "image_key",
             "text_key", "label_key", "csv_image_key", "csv_caption_key", "csv_separator", "data_workers", "attention")  # fmt: skip


def get_config() -> ml_collections.ConfigDict:
  """CLIP on captioned digits, or on your data (see the module docstring)."""
  c = loop.base_config(steps=600, batch_size=128, warmup_steps=60, weight_decay=0.1, log_every=25, checkpoint_every=200)
  c.update(specs.config_keys(image_size=0, channels=0, image_mean="", image_std=""))  # 0 / "": auto (clip_data)
  c.dataset = "captioned_digits"
  c.eval_dataset = ""  # "": the embedded digits' test split (a SPEC run then evaluates only when given one)
  c.tokenizer = ""  # "": words for the embedded captions, clip_bpe otherwise
  c.templates = ""  # "": the digits' held-out templates; openai for other sets
  c.model = ""  # "": tiny (init_from when init_from=open_clip:FILE)
  c.image_tower = ""  # "": resnet, the conv tower: on 4,000 images it beats the ViT (docs/results/clip.md)
  c.text_tower = "clip"
  c.loss = "softmax"
  c.loss_impl = "gather"
  c.eval_batch_size = 200
  c.context_length = 0  # 0: 16 for words, 77 for BPE (or the imported model's)
  c.activation = ""  # "": the preset's (gelu); quick_gelu for OpenAI's own weights
  c.attention = "auto"  # attention.dot_product_attention: auto (the CPU kernel on CPU, cuDNN for bf16 on GPU) | cpu | einsum | xla | cudnn
  c.augment_shift = 3  # random translation of training images by up to this many pixels
  c.remat = False
  c.export_to = ""  # --mode=export: open_clip:FILE.safetensors
  return c


_AUTO_NORM = Rule(lambda v: v == "" or specs.config_rules()["image_mean"].test(v), "empty (auto) or as image_mean")
RULES = {
  **loop.base_rules(),
  **specs.config_rules(),
  "image_size": Rule(lambda v: isinstance(v, int) and (v == 0 or 8 <= v <= 4096), "0 (the preset's) or 8 to 4096"),
  "channels": one_of(0, 1, 3),
  "image_mean": _AUTO_NORM,
  "image_std": _AUTO_NORM,
  "dataset": specs.spec_rule(cdata.EMBEDDED),
  "eval_dataset": specs.spec_rule(cdata.EMBEDDED, optional=True),
  "tokenizer": Rule(cdata.tokenizer_rule, "words, clip_bpe or hf:PATH (a tokenizer.json), or empty"),
  "templates": TEXT,
  "model": one_of("", "init_from", *clip_model.PRESETS),
  "image_tower": one_of("", "vit", "resnet"),
  "text_tower": one_of("clip", "minilm"),
  "loss": one_of("softmax", "sigmoid"),
  "loss_impl": one_of("gather", "chunked"),
  "eval_batch_size": POSITIVE,
  "context_length": Rule(lambda v: isinstance(v, int) and (v == 0 or v >= 2), "0 (auto) or an integer >= 2"),
  "activation": one_of("", "gelu", "quick_gelu", "gelu_tanh"),
  "attention": one_of(*ATTENTION_IMPLEMENTATIONS),
  "augment_shift": NON_NEGATIVE,
  "remat": BOOL,
  "export_to": TEXT,
}


def make_loss_fn(model, config, mesh, normalize=None):
  """The contrastive loss of a batch `{"image": uint8, "text": ids}` (images normalized by `normalize`,
  default the run's own `clip_data.normalization`, and randomly shifted)."""
  normalize = normalize or cdata.make_normalizer(*cdata.normalization(config))
  axes = shd.BATCH_AXES

  def contrastive(img, txt, scale, bias):
    if config.loss == "softmax":
      fn = losses.clip_softmax_loss_gathered if config.loss_impl == "gather" else losses.clip_softmax_loss_chunked
      return fn(img, txt, scale, mesh, axes)
    fn = losses.sigmoid_loss_gathered if config.loss_impl == "gather" else losses.sigmoid_loss_chunked
    return fn(img, txt, scale, bias, mesh, axes)

  def loss_fn(params, batch, rng):
    images = normalize(batch["image"], rng, config.augment_shift)
    img, txt, scale, bias = model.apply({"params": params}, images, batch["text"])
    loss = contrastive(img.astype(jnp.float32), txt.astype(jnp.float32), scale, bias)
    return loss, {"logit_scale": scale}

  return loss_fn


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  model, text_inputs, init_params = clip_run.build(config)
  source, caption_key, dataset = cdata.train_source(config)
  mean, std = cdata.normalization(config, lambda: dataset if dataset is not None else (r["image"] for r in source))
  cdata.resolve(config, mean, std)  # recorded: evaluation uses what training did, whatever the defaults become
  normalize = cdata.make_normalizer(mean, std)
  size, chans = cdata.image_size(config), cdata.channels(config)
  transform = cdata.make_transform(text_inputs, size, chans, caption_key, label=dataset is None)
  tx, schedule = train.make_optimizer(config, freeze_aliases=clip_weights.FREEZE_ALIASES)
  eval_fn = None
  if dataset is not None and config.eval_dataset:
    eval_fn = lambda params, step: clip_run.evaluate(model, params, config, mesh, text_inputs, normalize, workdir)
  return loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config, mesh, normalize),
    init_params=init_params,
    tx=tx,
    train_data=GrainBatches(
      source, config.batch_size, config.seed, transform=transform, workers=worker_count(config.data_workers)
    ),
    eval_fn=eval_fn,
    learning_rate_fn=schedule,
    converters=clip_run.converters(model, config),
  )


def run_eval(config, workdir):
  config, mesh, model, text_inputs, step, params = clip_run.restore(config, workdir, EVAL_KEYS)
  normalize = cdata.make_normalizer(*cdata.normalization(config))
  if not cdata.is_embedded(config) and not config.eval_dataset:
    raise UserError(f"--config.dataset={config.dataset} has no embedded test split: set --config.eval_dataset=SPEC")
  metrics = clip_run.evaluate(model, params, config, mesh, text_inputs, normalize, workdir)
  result = {"step": step, "loss": config.loss, "text_tower": config.text_tower, **metrics}
  if step == 0 and config.init_from:
    result["init_from"] = config.init_from
  from_checkpoint.report(workdir, result)
  return result


def run_export(config, workdir):
  if not config.export_to:
    raise UserError("--mode=export needs --config.export_to=open_clip:FILE.safetensors")
  config, _, model, _, step, params = clip_run.restore(config, workdir, EVAL_KEYS)
  path, json_path = clip_weights.export_open_clip(params, model.config, cdata.tokenizer_kind(config), config.export_to)
  print(f"exported step {step} to {path} (open_clip model config: {json_path})", flush=True)


def main(argv=None) -> int:
  clip_run.allow_missing_eval_workdir(sys.argv[1:] if argv is None else argv)
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval, "export": run_export},
    argv,
    prog="python -m experiments.clip",
    rules=RULES,
    relations=[loop.batch_relation(), cdata.sources_relation],
    eval_keys=EVAL_KEYS,
  )


if __name__ == "__main__":
  sys.exit(main())
