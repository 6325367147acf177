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
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from multimodal_jax import cli, loop, train
from multimodal_jax import sharding as shd
from multimodal_jax.config import BOOL, NON_NEGATIVE, POSITIVE, TEXT, Rule, check_divisible, one_of
from multimodal_jax.data import av_digits, specs, tfds_source
from multimodal_jax.data.pipeline import GrainBatches, eval_batches, load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.fusion import EarlyFusion, JointFusion, LateFusion, fusion_loss
from multimodal_jax.layers import MLP, ConvEncoder, dense

MODALITIES = ("audio", "image")  # AV-digits' modalities
EMBEDDED = ("av_digits",)
FUSIONS = ("early", "late", "joint", "joint_detached")
NUM_CLASSES = 10
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


def _modalities_ok(text: str) -> bool:
  entries = [e.strip() for e in text.split(",")]
  names = [e.partition(":")[0].strip() for e in entries]
  keys = [e.partition(":")[2].strip() if ":" in e else n for e, n in zip(entries, names, strict=True)]
  return all(names) and all(keys) and len(set(names)) == len(names)


NAME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a name")

RULES = {
  **loop.base_rules(),
  "dataset": specs.spec_rule(EMBEDDED),
  "fusion": one_of(*FUSIONS),
  "modalities": Rule(_modalities_ok, "a comma list of NAME or NAME:FEATURE_KEY, each NAME once"),
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


def modality_keys(config) -> dict[str, str]:
  """{modality name: feature key} in sorted-name order, from `modalities` (NAME or NAME:FEATURE_KEY)."""
  pairs = {}
  for entry in config.modalities.split(","):
    name, sep, key = (part.strip() for part in entry.partition(":"))
    if name:
      pairs[name] = key if sep else name
  return dict(sorted(pairs.items()))


def modalities_of(config) -> tuple[str, ...]:
  return tuple(modality_keys(config))


def modalities_relation(config) -> None:
  """AV-digits' modalities are named by their features (image, audio): a one-line error otherwise."""
  if specs.parse_spec(config.dataset, EMBEDDED).kind != "embedded":
    return
  pairs = modality_keys(config)
  if not pairs or any(name not in MODALITIES or key != name for name, key in pairs.items()):
    raise UserError(
      f"--config.modalities={config.modalities}: {config.dataset} has the modalities {', '.join(MODALITIES)} "
      "(choose a comma list of them)"
    )


@dataclasses.dataclass(frozen=True)
class FusionData:
  """The train and eval sources (records {modality: array, "label": int64}), each modality's shape
  without the batch, the number of classes, and whether encoders follow the features' ranks."""

  train: Any
  test: Any
  shapes: dict[str, tuple[int, ...]]
  num_classes: int
  by_rank: bool


class EncoderHead(nn.Module):
  """f_i(x_i): a modality's encoder followed by a linear classifier."""

  encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return dense(self.num_classes, ("mlp", "classes"), name="head")(self.encoder(x, train=train))


class SequenceEncoder(nn.Module):
  """`[batch, time, features]` -> `[batch, out]`: per stage a 1-D convolution over time (kernel 3)
  -> GroupNorm -> gelu -> max-pool 2, then the mean over time and a projection."""

  channels: tuple[int, ...] = (32, 64)
  out: int = 64
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for i, ch in enumerate(self.channels):
      x = nn.Conv(
        ch,
        (3,),
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_width", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=f"conv_{i}",
      )(x)
      x = nn.GroupNorm(
        num_groups=min(8, ch),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=f"norm_{i}",
      )(x)
      x = nn.max_pool(nn.gelu(x), (2,), strides=(2,), padding="SAME")
    x = x.mean(axis=1)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.gelu(dense(self.out, ("embed", "mlp"), name="proj")(x))


class VectorEncoder(nn.Module):
  """`[batch, ...]` (a vector or a scalar per example) -> `[batch, out]`: a two-layer MLP."""

  hidden: int = 128
  out: int = 64
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.gelu(dense(self.hidden, ("embed", "mlp"), name="hidden")(x.reshape(x.shape[0], -1)))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.gelu(dense(self.out, ("mlp", "embed"), name="proj")(x))


def encoder_for(config, shape: tuple[int, ...], by_rank: bool) -> nn.Module:
  """The encoder of a modality whose examples have `shape`: by its rank, or AV-digits' CNN."""
  if not by_rank or len(shape) == 3:
    return ConvEncoder(channels=(16, 32), features=config.features, dropout=config.dropout)
  if len(shape) == 2:
    return SequenceEncoder(out=config.features, dropout=config.dropout)
  return VectorEncoder(hidden=config.hidden, out=config.features, dropout=config.dropout)


def build_model(config, data: FusionData | None = None) -> nn.Module:
  """The fusion model of `config` for `data`'s modalities and classes (default: AV-digits')."""
  if config.fusion not in FUSIONS:
    raise UserError(f"fusion={config.fusion!r}: choose one of {', '.join(FUSIONS)}")
  modalities = modalities_of(config)
  classes = data.num_classes if data is not None else NUM_CLASSES

  def encoder(m):
    return encoder_for(config, data.shapes[m], data.by_rank) if data is not None else encoder_for(config, (), False)

  if len(modalities) == 1 or config.fusion == "late":
    # One modality is the unimodal baseline y = f(x): late fusion of a single predictor.
    return LateFusion(
      predictors={m: EncoderHead(encoder(m), classes) for m in modalities},
      learn_weights=config.late_learn_weights and len(modalities) > 1,
    )
  if config.fusion == "early":
    return EarlyFusion(f=MLP((2 * config.hidden, config.hidden), classes, config.dropout), modalities=modalities)
  if config.fusion == "joint_detached" and not config.unimodal_loss_weight:
    raise UserError("fusion=joint_detached trains each encoder only through its own loss: set unimodal_loss_weight > 0")
  return JointFusion(
    encoders={m: encoder(m) for m in modalities},
    g=MLP((config.hidden,), classes, config.dropout),
    num_classes=classes,
    detach_encoders=config.fusion == "joint_detached",
  )


def model_inputs(batch, modalities, zeroed: tuple[str, ...] = ()) -> dict:
  """The model's inputs from a batch: uint8 features (images) scaled to [0, 1]; `zeroed` modalities set to 0."""
  inputs = {}
  for m in modalities:
    x = batch[m].astype(jnp.float32)
    if batch[m].dtype == jnp.uint8:
      x = x / 255.0
    inputs[m] = jnp.zeros_like(x) if m in zeroed else x
  return inputs


def make_loss_fn(model, config):
  modalities = modalities_of(config)

  def loss_fn(params, batch, rng):
    logits, aux = model.apply({"params": params}, model_inputs(batch, modalities), train=True, rngs={"dropout": rng})
    return fusion_loss(logits, aux, batch["label"], unimodal_weight=config.unimodal_loss_weight)

  return loss_fn


def make_init_params(model, source, config):
  example = {k: np.asarray(v)[None] for k, v in source[0].items()}
  modalities = modalities_of(config)

  def init_params(rng):
    return model.init({"params": rng}, model_inputs(example, modalities), train=False)["params"]

  return init_params


def make_evaluator(model, config, mesh, source):
  """`evaluate(params) -> metrics`: test accuracy, also with each modality zeroed."""
  modalities = modalities_of(config)
  check_divisible("eval_batch_size", config.eval_batch_size, mesh)

  @jax.jit
  def correct(params, batch):
    out = {}
    for zeroed in [()] + [(m,) for m in modalities] * (len(modalities) > 1):
      logits, _ = model.apply({"params": params}, model_inputs(batch, modalities, zeroed), train=False)
      hits = (logits.argmax(-1) == batch["label"]) * batch["mask"]
      out["accuracy" + "".join(f"_without_{m}" for m in zeroed)] = hits.sum()
    out["count"] = batch["mask"].sum()
    return out

  def evaluate(params, step=None):
    del step
    totals = {}
    for batch in eval_batches(source, config.eval_batch_size):
      result = jax.device_get(correct(params, shd.host_to_global_batch(batch, mesh)))
      for k, v in result.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}

  return evaluate


def _load_av_digits(config) -> FusionData:
  data = load_on_every_process(lambda: av_digits.load(config.data_dir or None))
  shapes = {"image": (28, 28, 1), "audio": (av_digits.AUDIO_FRAMES, av_digits.MEL_BINS)}
  return FusionData(data["train"], data["test"], shapes, NUM_CLASSES, by_rank=False)


def _load_tfds(config, spec) -> FusionData:
  data = tfds_source.open_tfds(spec.name, config.data_dir or tfds_source.default_data_dir(), spec.config, spec.version)
  num_classes = len(data.class_names(config.label_key))
  fields, shapes = {}, {}
  for name, key in modality_keys(config).items():
    feature = data.feature(key, "modalities")
    dtype = np.dtype(getattr(feature, "np_dtype", object))
    shape = tuple(feature.shape)
    if dtype.kind not in "biuf":
      raise UserError(f"{data.spec}: the feature {key!r} is not numeric ({feature!r}): fusion takes arrays and images")
    if None in shape or -1 in shape or len(shape) > 3:
      raise UserError(
        f"{data.spec}: the feature {key!r} has shape {shape}: fusion takes fixed-size scalars, vectors, [T, F] "
        "sequences or [H, W, C] images"
      )
    fields[name], shapes[name] = (key, tfds_source.as_array), shape
  fields["label"] = (config.label_key, tfds_source.as_label)
  train, test = (tfds_source.FeatureSource(data.split(s), fields) for s in (config.train_split, config.eval_split))
  return FusionData(train, test, shapes, num_classes, by_rank=True)


def _load_data(config) -> FusionData:
  spec = specs.parse_spec(config.dataset, EMBEDDED)
  return _load_av_digits(config) if spec.kind == "embedded" else _load_tfds(config, spec)


def run_train(config, workdir):
  mesh = shd.make_mesh(config.mesh)
  loop.check_batch(config, mesh)
  data = _load_data(config)
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
  data = _load_data(config)
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
