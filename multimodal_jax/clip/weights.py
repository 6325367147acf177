"""CLIP weights in and out of a run: `init_from=open_clip:FILE` (FILE a path or a Hub name,
`hf-hub:ORG/NAME[@REVISION]`, read from the local Hugging Face cache), `freeze=image|text`, and
`export_to=open_clip:FILE.safetensors`.

Import reads the file with `convert.open_clip.load_open_clip` (no PyTorch), checks that its
architecture is the run's (`--config.model` and its overrides: image size, context, tokenizer
vocabulary, activation, ...) and names the first thing that differs in one line, then lays the
tensors out for the run's model (scanned layers or not). Export is the inverse, refused in one line
for what open_clip could not use: a ResNet image tower of ours, a precomputed text tower, images of
other than 3 channels, or a tokenizer other than CLIP's BPE (an exported model is only useful with
CLIP's vocabulary of 49,408 ids).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from multimodal_jax.clip import open_clip
from multimodal_jax.clip.model import ClipConfig
from multimodal_jax.convert import hf_hub, torch_files
from multimodal_jax.errors import UserError

# `--config.freeze` aliases: regexes over the '/'-joined param paths of `models.clip.CLIP`.
FREEZE_ALIASES = {
  "image": r"^(visual|image_projection)/",
  "text": r"^(text|text_projection)/",
}
BPE_VOCAB_SIZE = 49408

# (field, how to read it off a ClipConfig, the override that sets it here)
_FIELDS = (
  ("vision.image_size", lambda c: c.vision.image_size, "--config.image_size"),
  ("vision.channels", lambda c: c.vision.channels, "--config.channels"),
  ("text.vocab_size", lambda c: c.text.vocab_size, "--config.tokenizer=clip_bpe"),
  ("text.context_length", lambda c: c.text.context_length, "--config.context_length"),
  ("activation", lambda c: c.activation, "--config.activation"),
  ("logit_bias", lambda c: c.init_logit_bias is not None, "--config.loss (sigmoid has a logit bias)"),
  ("embed_dim", lambda c: c.embed_dim, None),
  ("vision.patch_size", lambda c: c.vision.patch_size, None),
  ("vision.width", lambda c: c.vision.width, None),
  ("vision.layers", lambda c: c.vision.layers, None),
  ("vision.heads", lambda c: c.vision.heads, None),
  ("vision.mlp_ratio", lambda c: int(c.vision.width * c.vision.mlp_ratio), None),
  ("text.width", lambda c: c.text.width, None),
  ("text.layers", lambda c: c.text.layers, None),
  ("text.heads", lambda c: c.text.heads, None),
  ("text.mlp_ratio", lambda c: int(c.text.width * c.text.mlp_ratio), None),
)


def _path(file: str, what: str) -> str:
  """The local weights file of FILE: a path, or `hf-hub:ORG/NAME[@REVISION]` (its open_clip
  checkpoint in the local Hugging Face cache, `convert.hf_hub`)."""
  if hf_hub.is_hub(file):
    return hf_hub.local_path(file, "open_clip", what.partition("=")[0])
  path = os.path.expanduser(file)
  if not os.path.isfile(path):
    raise UserError(f"{what}: no such file {path}; give the path of an open_clip .safetensors, .pt or .bin file")
  return path


def _load(path: str, scan: bool) -> tuple[ClipConfig, dict[str, Any]]:
  """(architecture, params) of a weights file, read once while neither it nor its model config changes."""
  config_path = open_clip.model_config_path(path)
  stamps = tuple(os.stat(p).st_mtime_ns for p in (path, config_path) if p)
  return _load_cached(path, config_path, stamps, scan)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, config_path: str | None, stamps: tuple, scan: bool) -> tuple[ClipConfig, dict[str, Any]]:
  try:
    return open_clip.load_open_clip(path, scan=scan)
  except (ValueError, torch_files.CheckpointFormatError, OSError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    beside = f" (model config {config_path})" if config_path else ""
    raise UserError(f"init_from=open_clip:{path}{beside} cannot be used: {message}") from None


def open_clip_architecture(file: str) -> ClipConfig:
  """The `ClipConfig` stored in an open_clip weights file (read off its tensors and its model config);
  FILE may be `hf-hub:ORG/NAME[@REVISION]`."""
  return _load(_path(file, f"init_from=open_clip:{file}"), True)[0]


def open_clip_preprocess(file: str) -> dict[str, Any] | None:
  """The `preprocess_cfg` beside an open_clip weights file (a Hub repo's image mean / std,
  interpolation and resize mode), or None."""
  return open_clip.read_preprocess_config(_path(file, f"init_from=open_clip:{file}"))


def check_fits(file_cfg: ClipConfig, ours: ClipConfig, source: str, model: str) -> None:
  """UserError naming the first field where the weights' architecture and the run's model differ."""
  if ours.vision.tower != "vit":
    raise UserError(f"init_from={source} holds a ViT image tower: set --config.image_tower=vit (or leave it empty)")
  if ours.text_tower != "transformer":
    raise UserError(f"init_from={source} holds CLIP's text transformer: set --config.text_tower=clip")
  for name, read, fix in _FIELDS:
    theirs, here = read(file_cfg), read(ours)
    if theirs != here:
      how = f"set {fix}" if fix else "choose the matching --config.model, or --config.model=init_from for the file's"
      raise UserError(
        f"init_from={source} does not fit --config.model={model}: {name} is {theirs} in the file but {here} here; {how}"
      )


def open_clip_converter(ours: ClipConfig, model: str):
  """The `loop.fit` / `init_from.initial_params` converter of `open_clip:FILE` for the model `ours`:
  `(path, abstract_params) -> params` laid out for `ours.scan`."""

  def convert(file: str, abstract_params: Any) -> dict[str, Any]:
    path = _path(file, f"init_from=open_clip:{file}")
    file_cfg, params = _load(path, ours.scan)
    check_fits(file_cfg, ours, f"open_clip:{file}", model)
    return params

  return convert


def export_open_clip(params: Any, config: ClipConfig, tokenizer: str, target: str) -> tuple[str, str]:
  """Writes `params` of `CLIP(config)` to `target` = `open_clip:FILE.safetensors` (and the model config
  open_clip needs to FILE.json); returns both paths. One-line UserError for what cannot export."""
  kind, _, file = target.partition(":")
  if kind != "open_clip" or not file.endswith(".safetensors"):
    raise UserError(f"--config.export_to={target}: expected open_clip:FILE.safetensors")
  if config.vision.tower != "vit" or config.vision.pool != "token":
    tower = config.vision.tower if config.vision.tower != "vit" else f"a ViT pooled by {config.vision.pool}"
    raise UserError(
      f"--config.export_to={target}: this run's image tower is {tower}, and open_clip takes our ViT pooled by its "
      "class token only (train with --config.image_tower=vit)"
    )
  if config.text_tower != "transformer":
    raise UserError(f"--config.export_to={target}: this run's text tower is precomputed (minilm); open_clip needs clip")
  if tokenizer != "clip_bpe" or config.text.vocab_size != BPE_VOCAB_SIZE:
    raise UserError(
      f"--config.export_to={target}: this run's tokenizer is {tokenizer}, and an exported model is only useful with "
      f"CLIP's BPE vocabulary of {BPE_VOCAB_SIZE} ids (train with --config.tokenizer=clip_bpe)"
    )
  if config.vision.channels != 3:
    raise UserError(f"--config.export_to={target}: open_clip takes 3-channel images (train with --config.channels=3)")
  path = os.path.abspath(os.path.expanduser(file))
  folder = os.path.dirname(path)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise UserError(f"--config.export_to={target}: cannot create {folder}: {e.strerror}") from None
  host = _to_numpy(params)
  partial = path[: -len(".safetensors")] + f".partial-{os.getpid()}.safetensors"
  try:
    config_partial = open_clip.save_open_clip(partial, host, dataclasses.replace(config))
    config_path = path[: -len(".safetensors")] + ".json"
    os.replace(config_partial, config_path)
    os.replace(partial, path)
  except OSError as e:
    raise UserError(f"--config.export_to={target}: cannot write {path}: {e.strerror}") from None
  return path, config_path


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)
