"""CLIP's config: every key declared once in `KEYS` (default, rule, help, group), from which
`get_config()` and `RULES` derive; `EVAL_KEYS` are the keys an evaluation may change. Empty (auto)
keys resolve once per run, in `multimodal_jax.clip.settings` (`resolve` -> the frozen `ClipSettings`)."""

from __future__ import annotations

import ml_collections

from multimodal_jax import config as cfg
from multimodal_jax import loop
from multimodal_jax.attention import ATTENTION_IMPLEMENTATIONS
from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import model as clip_model
from multimodal_jax.clip.settings import tokenizer_rule
from multimodal_jax.config import NON_NEGATIVE, POSITIVE, TEXT, Key, Rule, one_of
from multimodal_jax.data import specs

EVAL_KEYS = ("mesh", "data_dir", "eval_batch_size", "eval_dataset", "templates", "export_to", "image_key",
             "text_key", "label_key", "csv_image_key", "csv_caption_key", "csv_separator", "data_workers", "attention")  # fmt: skip


# The data settings' help lines (their defaults and rules: multimodal_jax.data.specs).
DATA_HELP = {
  "data_dir": "TFDS data dir and the image cache's home; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets",
  "image_key": "a TFDS dataset's image feature",
  "text_key": "a TFDS dataset's caption feature",
  "label_key": "a TFDS dataset's ClassLabel feature (zero-shot evaluation)",
  "csv_image_key": "csv: the image path column (open_clip's --csv-img-key)",
  "csv_caption_key": "csv: the caption column (open_clip's --csv-caption-key)",
  "csv_separator": "csv: the column separator (open_clip's --csv-separator)",
  "image_size": "image side in pixels",
  "channels": "image channels",
  "image_mean": "per-channel normalization mean",
  "image_std": "per-channel normalization std",
  "data_workers": "grain worker processes; -1: auto (pipeline.worker_count), 0: the main process",
}

_AUTO_NORM = Rule(lambda v: v == "" or specs.config_rules()["image_mean"].test(v), "empty (auto) or as image_mean")

KEYS = {
  **loop.base_keys(steps=600, batch_size=128, warmup_steps=60, weight_decay=0.1, log_every=25, checkpoint_every=200),
  "dataset": Key(
    "captioned_digits",
    specs.spec_rule(cdata.EMBEDDED),
    "the training pairs: captioned_digits, csv:PAIRS.tsv or tfds:NAME",
    "data",
  ),
  **cfg.keys_from(specs.config_keys(), specs.config_rules(), DATA_HELP, "data"),
  "image_size": Key(
    0,
    Rule(lambda v: isinstance(v, int) and (v == 0 or 8 <= v <= 4096), "0 (the preset's) or 8 to 4096"),
    "image side in pixels; 0: the preset's (tiny 32, ViT-B-32 224, the imported weights')",
    "data",
  ),
  "channels": Key(0, one_of(0, 1, 3), "image channels; 0: 1 for the embedded digits, 3 otherwise", "data"),
  "image_mean": Key(
    "", _AUTO_NORM, "openai, imagenet, dataset or numbers; empty: MNIST's for the digits, OpenAI's otherwise", "data"
  ),
  "image_std": Key("", _AUTO_NORM, "as image_mean, for the std", "data"),
  "augment_shift": Key(3, NON_NEGATIVE, "random translation of training images by up to this many pixels", "data"),
  "tokenizer": Key(
    "",
    Rule(tokenizer_rule, "words, clip_bpe or hf:PATH (a tokenizer.json), or empty"),
    "words, clip_bpe or hf:PATH; empty: words for the embedded captions, clip_bpe otherwise",
    "model",
  ),
  "context_length": Key(
    0,
    Rule(lambda v: isinstance(v, int) and (v == 0 or v >= 2), "0 (auto) or an integer >= 2"),
    "text tokens; 0: 16 for words, 77 for BPE (or the imported model's)",
    "model",
  ),
  "model": Key(
    "",
    one_of("", "init_from", *clip_model.PRESETS),
    "a preset of multimodal_jax.clip.model, or init_from (the imported weights' architecture); "
    "empty: tiny, or init_from with init_from=open_clip:FILE",
    "model",
  ),
  "image_tower": Key(
    "",
    one_of("", "vit", "resnet"),
    "vit or resnet; empty: resnet (on 4,000 images the conv tower beats the ViT), vit for open_clip weights",
    "model",
  ),
  "text_tower": Key("clip", one_of("clip", "minilm"), "clip (a Transformer) or minilm (init_from=minilm:DIR)", "model"),
  "activation": Key(
    "",
    one_of("", "gelu", "quick_gelu", "gelu_tanh"),
    "empty: the preset's (gelu); quick_gelu for OpenAI's own weights",
    "model",
  ),
  "attention": Key(
    "auto",
    one_of(*ATTENTION_IMPLEMENTATIONS),
    "attention.dot_product_attention: auto (the CPU kernel on CPU, cuDNN for bf16 on GPU), cpu, einsum, xla or cudnn",
    "model",
  ),
  "remat": cfg.remat_key(),
  "loss": Key("softmax", one_of("softmax", "sigmoid"), "softmax (CLIP's) or sigmoid (SigLIP's)", "loss"),
  "loss_impl": Key(
    "gather",
    one_of("gather", "chunked"),
    "gather (all embeddings to every device) or chunked (a ring: the text blocks travel round the devices)",
    "loss",
  ),
  "eval_dataset": Key(
    "",
    specs.spec_rule(cdata.EMBEDDED, optional=True),
    "folder:DIR, tfds:NAME or csv:; empty: the digits' test split (a SPEC run then evaluates only when given one)",
    "eval",
  ),
  "templates": Key(
    "",
    TEXT,
    "zero-shot templates: openai or a FILE of one per line; empty: the digits' held-out ones, openai otherwise",
    "eval",
  ),
  "eval_batch_size": Key(200, POSITIVE, "batch size of evaluation", "eval"),
  "export_to": Key("", TEXT, "--mode=export: open_clip:FILE.safetensors", "export"),
}

RULES = cfg.rules_of(KEYS)


@cfg.declares(KEYS)
def get_config() -> ml_collections.ConfigDict:
  """CLIP on captioned digits, or on your image-text pairs."""
  return cfg.make_config(KEYS)
