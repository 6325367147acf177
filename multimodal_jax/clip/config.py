"""TODO docstring."""

from __future__ import annotations

import ml_collections

from multimodal_jax import loop
from multimodal_jax.attention import ATTENTION_IMPLEMENTATIONS
from multimodal_jax.clip import data as cdata
from multimodal_jax.clip import model as clip_model
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, one_of
from multimodal_jax.data import specs

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
