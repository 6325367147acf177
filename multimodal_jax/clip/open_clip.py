"""Import OpenAI CLIP / open_clip PyTorch ViT checkpoints into `multimodal_jax.clip.model.CLIP` params.

  config, params = load_open_clip("open_clip_pytorch_model.bin")  # or .safetensors, or a state dict
  model = CLIP(config)
  img, txt, scale, bias = model.apply({"params": params}, images, tokens)

The architecture (a `ClipConfig`) is read off the tensor shapes: widths, layers, patch size, image
size, context length, vocabulary, embedding size, MLP width; heads are `width // 64` as in
open_clip (16 for the 1280 / 1408 / 1664 wide image towers of open_clip's ViT-H, -g and -bigG; pass
`vision_heads` / `text_heads` for models built with other head widths). Shapes cannot tell the MLP
activation: OpenAI's own checkpoints (open_clip's `pretrained="openai"` and `*-quickgelu` models)
were trained with QuickGELU, so pass `quick_gelu=True` for them (it defaults to True only when the
state dict carries OpenAI's `input_resolution` / `context_length` / `vocab_size` entries).

Images go in `[batch, H, W, C]` (open_clip's are `[batch, C, H, W]`), normalized as for the torch
model (OpenAI mean / std); text is tokenised as for open_clip (pad id 0, end-of-text last: our text
tower pools at the last non-pad token, which is where open_clip's argmax over ids lands).

The open_clip model config beside the file (`NAME.json`, or a Hub repo's `open_clip_config.json`)
gives the activation (`quick_gelu`, GELU's `act_kwargs`) and head counts, and every other field of
it is honoured or refused in one line (`open_clip_export.options_from_model_config`): an image tower
pooled by average, a text tower without its causal mask or pooled at the last position would give
other features than open_clip's, so they do not import.

Not supported (a ValueError says so): OpenAI's ModifiedResNet image towers (RN50, RN101, ...), timm
or Hugging Face towers, attention pooling, layer scale, projections with biases, JIT archives.
Files are read with `safetensors.numpy` or `convert.torch_files` (tensors and plain containers only,
never arbitrary pickled objects; no PyTorch needed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from multimodal_jax.clip.model import ClipConfig, TextConfig, VisionConfig
from multimodal_jax.clip.open_clip_export import (  # the model configs and the inverse, beside the import
  check_against_model_config,
  export_state_dict,
  model_config_path,
  open_clip_model_config,
  options_from_model_config,
  read_model_config,
  read_preprocess_config,
  save_open_clip,
)
from multimodal_jax.convert import torch_files

# Entries of OpenAI's JIT state dicts that are not weights (OpenAI's build_model deletes them too).
_OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")
_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size|attn_mask|visual\.attn_mask)$")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")
# open_clip's ViT-H/14, ViT-g/14 and ViT-bigG/14 image towers use head widths 80, 88 and 104, not 64.
_OPEN_CLIP_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A checkpoint as `{name: float32 / int numpy array}` in open_clip's naming.

  `source`: a `.safetensors` file, a `.pt` / `.pth` / `.bin` file written by `torch.save` (read
  by `convert.torch_files` without PyTorch; a `{"state_dict": ...}` training checkpoint is
  unwrapped), or a state dict of torch tensors / arrays. A DistributedDataParallel `module.` prefix
  is stripped.
  """
  if isinstance(source, Mapping):
    raw = dict(source)
  else:
    path = os.fspath(source)
    if path.endswith(".safetensors"):
      raw = torch_files.read_safetensors(path)
    else:
      raw = torch_files.load(path)  # torch.save files, read without PyTorch
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
      raw = dict(raw["state_dict"])
    if not isinstance(raw, Mapping):
      raise torch_files.CheckpointFormatError(f"{path} holds a {type(raw).__name__}, not a state dict")
  out = {}
  for name, value in raw.items():
    out[name.removeprefix("module.")] = _to_numpy(value)
  for name in ("logit_scale", "logit_bias"):  # shape [1] in models built with nonscalar_logit_scale
    if name in out and np.shape(out[name]) == (1,):
      out[name] = out[name].reshape(())
  return out


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (numpy has no bfloat16: go through float32)
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    return value.numpy()
  array = np.asarray(value)
  floating = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
  return array.astype(np.float32) if floating else array


def _unsupported(sd: Mapping[str, Any]) -> str | None:
  keys = list(sd)
  if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
    return (
      "this is an OpenAI ModifiedResNet (RN50 / RN101 / RN50x4 ...) checkpoint: only ViT image towers "
      "convert to multimodal_jax's CLIP"
    )
  if any(k.startswith("visual.trunk.") for k in keys) or any(k.startswith("text.transformer.") for k in keys):
    return "this checkpoint has a timm / Hugging Face tower (open_clip's TimmModel / HFTextEncoder): not supported"
  if "visual.conv1.weight" not in sd:
    return "state dict has no tensor 'visual.conv1.weight': not an OpenAI / open_clip ViT CLIP checkpoint"
  return None


def _num_blocks(sd: Mapping[str, Any], vision: bool) -> int:
  indices = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and bool(m.group(1)) == vision}
  return max(indices) + 1 if indices else 0


def _mlp_ratio(hidden: int, width: int) -> float:
  """A ratio r with int(width * r) == hidden (the models size their MLPs as open_clip does)."""
  ratio = hidden / width
  return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def config_from_state_dict(
  sd: Mapping[str, Any],
  *,
  quick_gelu: bool | None = None,
  vision_heads: int | None = None,
  text_heads: int | None = None,
  **overrides: Any,
) -> ClipConfig:
  """The `ClipConfig` a state dict was saved from, read off its tensor shapes.

  `overrides` are further `ClipConfig` fields (e.g. `scan=False`, `scan_unroll=1`, `remat=True`).
  """
  problem = _unsupported(sd)
  if problem:
    raise ValueError(problem)

  def shape(name: str) -> tuple[int, ...]:
    if name not in sd:
      raise ValueError(f"state dict has no tensor {name!r}: not an OpenAI / open_clip ViT CLIP checkpoint")
    return tuple(np.shape(sd[name]))

  width, channels, patch, patch_w = shape("visual.conv1.weight")
  tokens = shape("visual.positional_embedding")[0] - 1
  grid = round(tokens**0.5)
  if patch != patch_w or grid * grid != tokens:
    raise ValueError(
      f"tensor 'visual.positional_embedding' has shape {shape('visual.positional_embedding')}: "
      "expected a square patch grid plus a class token"
    )
  v_layers = _num_blocks(sd, vision=True)
  v_mlp = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0] if v_layers else 4 * width
  vocab, t_width = shape("token_embedding.weight")
  context = shape("positional_embedding")[0]
  t_layers = _num_blocks(sd, vision=False)
  t_mlp = shape("transformer.resblocks.0.mlp.c_fc.weight")[0] if t_layers else 4 * t_width
  embed_dim = shape("text_projection")[1]
  if quick_gelu is None:
    quick_gelu = all(k in sd for k in _OPENAI_MARKERS)
  bias = float(np.asarray(sd["logit_bias"]).reshape(())) if "logit_bias" in sd else None
  fields = {
    "embed_dim": embed_dim,
    "vision": VisionConfig(
      image_size=grid * patch,
      patch_size=patch,
      width=width,
      layers=v_layers,
      heads=vision_heads or _OPEN_CLIP_VISION_HEADS.get(width, max(width // 64, 1)),
      mlp_ratio=_mlp_ratio(v_mlp, width),
      channels=channels,
    ),
    "text": TextConfig(
      vocab_size=vocab,
      context_length=context,
      width=t_width,
      layers=t_layers,
      heads=text_heads or max(t_width // 64, 1),
      mlp_ratio=_mlp_ratio(t_mlp, t_width),
    ),
    "init_logit_bias": bias,
    "activation": "quick_gelu" if quick_gelu else "gelu",
  }
  fields.update(overrides)
  return ClipConfig(**fields)


def _expected(config: ClipConfig) -> list[tuple[str, tuple[int, ...]]]:
  """(open_clip name, shape) of every tensor `config` needs, in state-dict order."""
  v, t = config.vision, config.text
  grid = v.image_size // v.patch_size

  def blocks(prefix: str, width: int, layers: int, mlp_ratio: float):
    hidden = int(width * mlp_ratio)
    out = []
    for i in range(layers):
      p = f"{prefix}transformer.resblocks.{i}."
      out += [
        (p + "ln_1.weight", (width,)),
        (p + "ln_1.bias", (width,)),
        (p + "attn.in_proj_weight", (3 * width, width)),
        (p + "attn.in_proj_bias", (3 * width,)),
        (p + "attn.out_proj.weight", (width, width)),
        (p + "attn.out_proj.bias", (width,)),
        (p + "ln_2.weight", (width,)),
        (p + "ln_2.bias", (width,)),
        (p + "mlp.c_fc.weight", (hidden, width)),
        (p + "mlp.c_fc.bias", (hidden,)),
        (p + "mlp.c_proj.weight", (width, hidden)),
        (p + "mlp.c_proj.bias", (width,)),
      ]
    return out

  names = [
    ("positional_embedding", (t.context_length, t.width)),
    ("text_projection", (t.width, config.embed_dim)),
    ("logit_scale", ()),
    ("visual.class_embedding", (v.width,)),
    ("visual.positional_embedding", (grid * grid + 1, v.width)),
    ("visual.proj", (v.width, config.embed_dim)),
    ("visual.conv1.weight", (v.width, v.channels, v.patch_size, v.patch_size)),
    ("visual.ln_pre.weight", (v.width,)),
    ("visual.ln_pre.bias", (v.width,)),
    *blocks("visual.", v.width, v.layers, v.mlp_ratio),
    ("visual.ln_post.weight", (v.width,)),
    ("visual.ln_post.bias", (v.width,)),
    *blocks("", t.width, t.layers, t.mlp_ratio),
    ("token_embedding.weight", (t.vocab_size, t.width)),
    ("ln_final.weight", (t.width,)),
    ("ln_final.bias", (t.width,)),
  ]
  if config.init_logit_bias is not None:
    names.append(("logit_bias", ()))
  return names


def check_state_dict(sd: Mapping[str, Any], config: ClipConfig) -> None:
  """Raises a one-line ValueError naming the first tensor `config` needs that `sd` lacks or has in
  another shape, then the first tensor `sd` has that `config` cannot hold."""
  problem = _unsupported(sd)
  if problem:
    raise ValueError(problem)
  if config.vision.tower != "vit" or config.vision.pool != "token":
    raise ValueError("open_clip weights need vision.tower='vit' and vision.pool='token'")
  for tower in (config.vision, config.text):
    if tower.width % tower.heads:
      raise ValueError(f"width {tower.width} is not divisible by heads {tower.heads}")
  expected = _expected(config)
  for name, shape in expected:
    if name not in sd:
      raise ValueError(f"state dict has no tensor {name!r} (expected shape {shape}) for this CLIP config")
    if tuple(np.shape(sd[name])) != shape:
      raise ValueError(f"tensor {name!r} has shape {tuple(np.shape(sd[name]))}, expected {shape} for this CLIP config")
  known = {name for name, _ in expected}
  for name in sd:
    if name not in known and not _IGNORED.match(name):
      raise ValueError(
        f"state dict has tensor {name!r} of shape {tuple(np.shape(sd[name]))}, which this CLIP config has no place "
        "for (attention pooling, layer scale, projection biases, extra layers ... are not supported)"
      )


def convert_state_dict(sd: Mapping[str, Any], config: ClipConfig) -> dict[str, Any]:
  """open_clip tensors -> the `params` tree of `CLIP(config)`: nested dicts of float32 numpy arrays,
  scanned (`transformer/blocks/...` with a leading [layers] axis) or not (`transformer/block_{i}/...`)
  after `config.scan`. `sd` as returned by `load_state_dict`; checked by `check_state_dict` first."""
  sd = {k: _to_numpy(v) for k, v in sd.items()}
  check_state_dict(sd, config)
  f32 = lambda name: np.asarray(sd[name], np.float32)

  def block(prefix: str, width: int, heads: int) -> dict[str, Any]:
    head_dim = width // heads
    in_w = f32(prefix + "attn.in_proj_weight")  # [3 * width (q, k, v; heads; head_dim), width]
    out_w = f32(prefix + "attn.out_proj.weight")  # [width, heads * head_dim]
    ln = lambda name: {"scale": f32(prefix + name + ".weight"), "bias": f32(prefix + name + ".bias")}
    return {
      "ln_1": ln("ln_1"),
      "attn": {
        "qkv": {
          "kernel": in_w.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2),
          "bias": f32(prefix + "attn.in_proj_bias").reshape(3, heads, head_dim),
        },
        "out": {"kernel": out_w.T.reshape(heads, head_dim, width), "bias": f32(prefix + "attn.out_proj.bias")},
      },
      "ln_2": ln("ln_2"),
      "fc1": {"kernel": f32(prefix + "mlp.c_fc.weight").T, "bias": f32(prefix + "mlp.c_fc.bias")},
      "fc2": {"kernel": f32(prefix + "mlp.c_proj.weight").T, "bias": f32(prefix + "mlp.c_proj.bias")},
    }

  def transformer(prefix: str, tower: VisionConfig | TextConfig) -> dict[str, Any]:
    layers = [block(f"{prefix}transformer.resblocks.{i}.", tower.width, tower.heads) for i in range(tower.layers)]
    if not config.scan:
      return {f"block_{i}": b for i, b in enumerate(layers)}
    import jax

    return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers)}

  ln = lambda name: {"scale": f32(name + ".weight"), "bias": f32(name + ".bias")}
  params: dict[str, Any] = {
    "visual": {
      "patch_embed": {"kernel": f32("visual.conv1.weight").transpose(2, 3, 1, 0)},  # OIHW -> HWIO
      "class_embedding": f32("visual.class_embedding"),
      "positional_embedding": f32("visual.positional_embedding"),
      "ln_pre": ln("visual.ln_pre"),
      "transformer": transformer("visual.", config.vision),
      "ln_post": ln("visual.ln_post"),
    },
    "text": {
      "token_embedding": f32("token_embedding.weight"),
      "positional_embedding": f32("positional_embedding"),
      "transformer": transformer("", config.text),
      "ln_final": ln("ln_final"),
    },
    "image_projection": {"kernel": f32("visual.proj")},
    "text_projection": {"kernel": f32("text_projection")},
    "logit_scale": f32("logit_scale").reshape(()),
  }
  if config.init_logit_bias is not None:
    params["logit_bias"] = f32("logit_bias").reshape(())
  return params


def load_open_clip(
  source: str | os.PathLike | Mapping[str, Any],
  *,
  quick_gelu: bool | None = None,
  vision_heads: int | None = None,
  text_heads: int | None = None,
  **overrides: Any,
) -> tuple[ClipConfig, dict[str, Any]]:
  """`(cfg, params)` for `CLIP(cfg)` from an OpenAI / open_clip ViT checkpoint (see the module
  docstring). `overrides` are further ClipConfig fields, e.g. `scan=False`."""
  sd = load_state_dict(source)
  model_cfg = None if isinstance(source, Mapping) else read_model_config(source)
  if model_cfg is not None:
    derived = options_from_model_config(model_cfg)  # refuses what our CLIP does not compute
    if quick_gelu is None and "activation" not in overrides:
      overrides = {**overrides, "activation": derived["activation"]}  # quick_gelu, or GELU as act_kwargs say
    vision_heads, text_heads = vision_heads or derived["vision_heads"], text_heads or derived["text_heads"]
  cfg = config_from_state_dict(sd, quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads, **overrides)
  if model_cfg is not None:
    check_against_model_config(cfg, model_cfg)
  return cfg, convert_state_dict(sd, cfg)


__all__ = [
  "check_state_dict",
  "config_from_state_dict",
  "convert_state_dict",
  "export_state_dict",
  "load_open_clip",
  "load_state_dict",
  "model_config_path",
  "open_clip_model_config",
  "read_model_config",
  "read_preprocess_config",
  "save_open_clip",
]
