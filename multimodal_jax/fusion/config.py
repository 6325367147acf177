"""Fusion's config: every key with its default and rule; the keys an evaluation may change."""

from __future__ import annotations

import ml_collections

from multimodal_jax import loop
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, one_of
from multimodal_jax.data import specs
from multimodal_jax.fusion.data import EMBEDDED, MODALITIES_RULE
from multimodal_jax.fusion.model import FUSIONS

# Keys that may differ between training and evaluating a checkpoint; the rest come from it.
EVAL_KEYS = ("mesh", "data_dir", "eval_batch_size")


def get_config() -> ml_collections.ConfigDict:
  """Fusion of AV-digits images and spoken digits (see the module docstring)."""
  c = loop.base_config(
    learning_rate=2e-3, warmup_steps=50, weight_decay=1e-4, eval_every=500, checkpoint_every=250, log_every=50
  )
  c.dataset = "av_digits"  # or tfds:NAME[:CONFIG][@VERSION] prepared as array_record in data_dir
  c.fusion = "joint"
  c.modalities = "image,audio"  # NAME or NAME:FEATURE_KEY, comma-separated (FEATURE_KEY defaults to NAME)
  c.label_key = "label"  # a TFDS dataset's ClassLabel feature
  c.train_split = "train"
  c.eval_split = "test"
  c.eval_batch_size = 200
  c.features = 64  # width of each modality's encoding
  c.hidden = 128
  c.dropout = 0.1
  c.late_learn_weights = True
  c.unimodal_loss_weight = 1.0  # per-modality head losses (joint and late fusion)
  c.data_dir = ""  # TFDS data dir; empty: the TFDS default
  return c


NAME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a name")


RULES = {
  **loop.base_rules(),
  "dataset": specs.spec_rule(EMBEDDED),
  "fusion": one_of(*FUSIONS),
  "modalities": MODALITIES_RULE,
  "label_key": NAME,
  "train_split": NAME,
  "eval_split": NAME,
  "eval_batch_size": POSITIVE,
  "features": POSITIVE,
  "hidden": POSITIVE,
  "dropout": Rule(lambda v: 0 <= v < 1, "a probability in [0, 1)"),
  "late_learn_weights": BOOL,
  "unimodal_loss_weight": NON_NEGATIVE,
  "data_dir": TEXT,
}
