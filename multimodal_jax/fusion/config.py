"""Fusion's config: every key declared once in `KEYS` (default, rule, help, group); `get_config()` and
`RULES` derive from it; `EVAL_KEYS` are the keys an evaluation may change."""

from __future__ import annotations

import ml_collections

from multimodal_jax import config as cfg
from multimodal_jax import loop
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Key, Rule, one_of
from multimodal_jax.data import specs
from multimodal_jax.fusion.data import EMBEDDED, MODALITIES_RULE
from multimodal_jax.fusion.model import FUSIONS

# Keys that may differ between training and evaluating a checkpoint; the rest come from it.
EVAL_KEYS = ("mesh", "data_dir", "eval_batch_size")

NAME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a name")

KEYS = {
  **loop.base_keys(
    learning_rate=2e-3, warmup_steps=50, weight_decay=1e-4, eval_every=500, checkpoint_every=250, log_every=50
  ),
  "dataset": Key(
    "av_digits", specs.spec_rule(EMBEDDED), "av_digits, or tfds:NAME[:CONFIG][@VERSION] prepared in data_dir", "data"
  ),
  "modalities": Key(
    "image,audio",
    MODALITIES_RULE,
    "NAME or NAME:FEATURE_KEY, comma-separated (FEATURE_KEY defaults to NAME); one name: the unimodal baseline",
    "data",
  ),
  "label_key": Key("label", NAME, "a TFDS dataset's ClassLabel feature", "data"),
  "train_split": Key("train", NAME, "the split training reads", "data"),
  "eval_split": Key("test", NAME, "the split evaluation reads", "data"),
  "data_dir": Key("", TEXT, "TFDS data dir; empty: the TFDS default", "data"),
  "fusion": Key(
    "joint",
    one_of(*FUSIONS),
    "early, late, joint, or joint_detached (each encoder learns only from its own modality's loss)",
    "model",
  ),
  "features": Key(64, POSITIVE, "width of each modality's encoding", "model"),
  "hidden": Key(128, POSITIVE, "hidden width of the encoders' and the fusion classifier's layers", "model"),
  "dropout": Key(0.1, Rule(lambda v: 0 <= v < 1, "a probability in [0, 1)"), "dropout rate", "model"),
  "remat": cfg.remat_key(),
  "late_learn_weights": Key(True, BOOL, "late fusion learns the weights of the modalities' logits", "model"),
  "unimodal_loss_weight": Key(1.0, NON_NEGATIVE, "weight of the per-modality head losses (joint, late)", "loss"),
  "eval_batch_size": Key(200, POSITIVE, "batch size of evaluation", "eval"),
}

RULES = cfg.rules_of(KEYS)


@cfg.declares(KEYS)
def get_config() -> ml_collections.ConfigDict:
  """Fusion of AV-digits images and spoken digits, or of any TFDS dataset's features."""
  return cfg.make_config(KEYS)
