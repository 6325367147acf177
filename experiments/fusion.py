"""AV-digits fusion: handwritten digits (degraded) + spoken digits (noisy), fused early, late or jointly.

  python -m experiments.fusion --workdir /tmp/fusion                 # train (resumes if DIR has a checkpoint)
  python -m experiments.fusion --workdir /tmp/fusion --mode=eval     # evaluate the latest checkpoint

Any TFDS dataset with several features and a ClassLabel, prepared as array_record (docs/data.md):

  python -m experiments.fusion --workdir /tmp/f --config.dataset=tfds:NAME --config.data_dir=DIR \
    --config.modalities=photo:image,sensors:readings --config.label_key=label

Each modality NAME:FEATURE_KEY gets an encoder chosen by its feature's rank: `[H, W, C]` a CNN,
`[T, F]` 1-D convolutions over T, a vector (or scalar) an MLP; uint8 features are scaled to [0, 1].
The classes come from the label's ClassLabel; training reads `train_split`, evaluation `eval_split`.

Keys: dataset=av_digits|tfds:NAME[:CONFIG][@VERSION], fusion=early|late|joint|joint_detached (the
seed's joint variant: each encoder learns only from its own modality's loss), modalities=image,audio
(AV-digits' names; one name = the unimodal baseline), steps, batch_size (global), seed, mesh (e.g.
data:4,fsdp:2). AV-digits' encoders are CNNs for both modalities (its spectrograms are read as
images). Results of the default config: README.md.

The pieces live in the library: the data and modalities in `multimodal_jax.fusion_data`, the
encoders in `multimodal_jax.models.fusion_encoders`, the model, loss and evaluator in
`multimodal_jax.fusion_run`; this module holds the config and wires them into `loop.fit`.
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections

from multimodal_jax import cli, loop, train
from multimodal_jax import sharding as shd
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, one_of
from multimodal_jax.data import specs
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.fusion_data import EMBEDDED, MODALITIES_RULE, load_data, modalities_of, modalities_relation
from multimodal_jax.fusion_run import FUSIONS, build_model, make_evaluator, make_init_params, make_loss_fn

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


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  data = load_data(config)
  model = build_model(config, data)
  tx, schedule = train.make_optimizer(config)
  result = loop.fit(
    workdir=workdir,
    config=config,
    mesh=mesh,
    loss_fn=make_loss_fn(model, config),
    init_params=make_init_params(model, data.train, config),
    tx=tx,
    train_data=GrainBatches(data.train, config.batch_size, config.seed),
    eval_fn=make_evaluator(model, config, mesh, data.test),
    learning_rate_fn=schedule,
  )
  if jax.process_index() == 0 and result.eval_metrics:
    print(json.dumps({"step": config.steps, **result.eval_metrics}), flush=True)
  return result


def run_eval(config, workdir):
  config = from_checkpoint.saved_config(workdir, config, EVAL_KEYS)
  mesh = shd.make_mesh(config.mesh)
  data = load_data(config)
  model = build_model(config, data)
  step, params = from_checkpoint.restore_params(workdir, make_init_params(model, data.train, config), mesh)
  metrics = make_evaluator(model, config, mesh, data.test)(params)
  result = {"step": step, "fusion": config.fusion, "modalities": ",".join(modalities_of(config)), **metrics}
  from_checkpoint.report(workdir, result)
  return result


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "eval": run_eval},
    argv,
    prog="python -m experiments.fusion",
    rules=RULES,
    relations=[loop.batch_relation(), modalities_relation],
    eval_keys=EVAL_KEYS,
  )


if __name__ == "__main__":
  sys.exit(main())
