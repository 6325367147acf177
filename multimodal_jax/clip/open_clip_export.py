"""open_clip's model configs (read beside imported weights, written beside exported ones) and the
export of multimodal_jax CLIP params to open_clip: the inverse of `convert.open_clip`'s import.

  save_open_clip("out/model.safetensors", params, config)   # + out/model.json, the model config open_clip needs
  model = open_clip.model.CLIP(**json.load(open("out/model.json"))["model_cfg"]); model.load_state_dict(...)

Tested as a round trip (export, then `load_open_clip`, gives the same params) and against open_clip's
own embeddings of the exported file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from multimodal_jax.clip.model import ClipConfig, TextConfig, VisionConfig


def export_state_dict(params: Mapping[str, Any], config: ClipConfig) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict`: `CLIP(config)` params -> open_clip's tensors (names, layouts
  and shapes of open_clip's `CLIP` with a ViT tower), float32 numpy arrays."""
  if config.vision.tower != "vit" or config.vision.pool != "token" or config.text_tower != "transformer":
    raise ValueError(
      "only a ViT image tower with class-token pooling and a Transformer text tower export to open_clip "
      f"(this model: image_tower={config.vision.tower}, pool={config.vision.pool}, text_tower={config.text_tower})"
    )
  f32 = lambda x: np.asarray(x, np.float32)
  out: dict[str, np.ndarray] = {}

  def layers_of(transformer: Mapping[str, Any], count: int) -> list[Mapping[str, Any]]:
    if "blocks" in transformer:  # scanned: a leading [layers] axis on every leaf
      return [_index_tree(transformer["blocks"], i) for i in range(count)]
    return [transformer[f"block_{i}"] for i in range(count)]

  def blocks(prefix: str, transformer: Mapping[str, Any], tower: VisionConfig | TextConfig) -> None:
    for i, b in enumerate(layers_of(transformer, tower.layers)):
      p = f"{prefix}transformer.resblocks.{i}."
      qkv = f32(b["attn"]["qkv"]["kernel"])  # [width, 3, heads, head_dim]
      out[p + "ln_1.weight"], out[p + "ln_1.bias"] = f32(b["ln_1"]["scale"]), f32(b["ln_1"]["bias"])
      out[p + "attn.in_proj_weight"] = qkv.transpose(1, 2, 3, 0).reshape(3 * tower.width, tower.width)
      out[p + "attn.in_proj_bias"] = f32(b["attn"]["qkv"]["bias"]).reshape(3 * tower.width)
      out[p + "attn.out_proj.weight"] = f32(b["attn"]["out"]["kernel"]).reshape(tower.width, tower.width).T
      out[p + "attn.out_proj.bias"] = f32(b["attn"]["out"]["bias"])
      out[p + "ln_2.weight"], out[p + "ln_2.bias"] = f32(b["ln_2"]["scale"]), f32(b["ln_2"]["bias"])
      out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = f32(b["fc1"]["kernel"]).T, f32(b["fc1"]["bias"])
      out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = f32(b["fc2"]["kernel"]).T, f32(b["fc2"]["bias"])

  def norm(name: str, tree: Mapping[str, Any]) -> None:
    out[name + ".weight"], out[name + ".bias"] = f32(tree["scale"]), f32(tree["bias"])

  visual, text = params["visual"], params["text"]
  out["visual.conv1.weight"] = f32(visual["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)
  out["visual.class_embedding"] = f32(visual["class_embedding"])
  out["visual.positional_embedding"] = f32(visual["positional_embedding"])
  norm("visual.ln_pre", visual["ln_pre"])
  blocks("visual.", visual["transformer"], config.vision)
  norm("visual.ln_post", visual["ln_post"])
  out["visual.proj"] = f32(params["image_projection"]["kernel"])
  out["token_embedding.weight"] = f32(text["token_embedding"])
  out["positional_embedding"] = f32(text["positional_embedding"])
  blocks("", text["transformer"], config.text)
  norm("ln_final", text["ln_final"])
  out["text_projection"] = f32(params["text_projection"]["kernel"])
  out["logit_scale"] = f32(params["logit_scale"]).reshape(())
  if "logit_bias" in params:
    out["logit_bias"] = f32(params["logit_bias"]).reshape(())
  return {k: np.array(v, order="C") for k, v in out.items()}  # (ascontiguousarray would make 0-d 1-d)


def open_clip_model_config(config: ClipConfig) -> dict[str, Any]:
  """The model config open_clip builds `config`'s architecture from (`open_clip.create_model(name)`
  after registering it, or `CLIP(**model_config)`): what the exported weights need beside them.
  Activations other than GELU / QuickGELU have no open_clip equivalent (ValueError)."""
  activation = config.activation
  if activation not in ("gelu", "quick_gelu"):
    raise ValueError(f"activation {activation!r} has no open_clip equivalent (gelu or quick_gelu)")
  v, t = config.vision, config.text
  model_config: dict[str, Any] = {
    "embed_dim": config.embed_dim,
    "quick_gelu": activation == "quick_gelu",
    "vision_cfg": {
      "image_size": v.image_size,
      "patch_size": v.patch_size,
      "width": v.width,
      "layers": v.layers,
      "head_width": v.width // v.heads,
      "mlp_ratio": v.mlp_ratio,
    },
    "text_cfg": {
      "context_length": t.context_length,
      "vocab_size": t.vocab_size,
      "width": t.width,
      "heads": t.heads,
      "layers": t.layers,
      "mlp_ratio": t.mlp_ratio,
    },
  }
  if config.init_logit_bias is not None:
    model_config["init_logit_bias"] = config.init_logit_bias
  return model_config


def save_open_clip(path: str | os.PathLike, params: Mapping[str, Any], config: ClipConfig) -> str:
  """Writes `params` as open_clip weights to `path` (.safetensors) and the model config open_clip
  needs to `path` with `.json` in place of `.safetensors`; returns the config's path."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: export writes .safetensors files")
  config_path = path[: -len(".safetensors")] + ".json"
  model_config = open_clip_model_config(config)
  save_file(export_state_dict(params, config), path)
  with open(config_path, "w") as f:
    json.dump({"model_cfg": model_config}, f, indent=2)
  return config_path


def _index_tree(tree: Any, i: int) -> Any:
  if isinstance(tree, Mapping):
    return {k: _index_tree(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]


# Options of open_clip's model configs that change the numbers but leave no trace in the tensors:
# the values our CLIP computes with. A config asking for anything else is refused.
_SAME_AS_OURS = {
  "vision_cfg": {
    "attentional_pool": (False, None), "global_average_pool": (False, None), "pool_type": ("tok", None),
    "ls_init_value": (None,), "final_ln_after_pool": (False, None), "no_ln_pre": (False, None),
    "patch_dropout": (0, 0.0, None), "output_tokens": (False, None), "timm_model_name": (None,),
    "act_kwargs": (None,), "norm_kwargs": (None,),
  },
  "text_cfg": {
    "pool_type": ("argmax", None), "no_causal_mask": (False, None), "proj_bias": (False, None),
    "ls_init_value": (None,), "embed_cls": (False, None), "final_ln_after_pool": (False, None),
    "hf_model_name": (None,), "output_tokens": (False, None), "act_kwargs": (None,), "norm_kwargs": (None,),
    "pad_id": (0, None), "proj_type": ("linear", None),
  },
}  # fmt: skip


def read_model_config(weights: str | os.PathLike) -> dict[str, Any] | None:
  """The open_clip model config stored beside a weights file, if any: `NAME.json` next to
  `NAME.safetensors` / `NAME.bin` (as `save_open_clip` writes), or `open_clip_config.json` in the
  same folder (open_clip's pretrained folders). Its `model_cfg` entry when it has one."""
  path = os.fspath(weights)
  folder = os.path.dirname(os.path.abspath(path))
  candidates = [os.path.splitext(path)[0] + ".json", os.path.join(folder, "open_clip_config.json")]
  for candidate in candidates:
    if os.path.isfile(candidate):
      try:
        with open(candidate) as f:
          raw = json.load(f)
      except (OSError, ValueError) as e:
        raise ValueError(f"{candidate} is not a readable JSON model config ({e})") from None
      return raw.get("model_cfg", raw) if isinstance(raw, dict) else None
  return None


def options_from_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The options the tensors cannot tell: activation and head counts, with open_clip's defaults."""
  for tower, allowed in _SAME_AS_OURS.items():
    for key, values in allowed.items():
      value = model_cfg.get(tower, {}).get(key)
      if value not in values:
        raise ValueError(
          f"the model config sets {tower}.{key}={value!r}, which multimodal_jax's CLIP does not compute "
          f"(it computes {values[0]!r})"
        )
  vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
  width = vision.get("width", 768)
  return {
    "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
    "vision_heads": max(width // vision.get("head_width", 64), 1),
    "text_heads": text.get("heads", 8),
  }


def check_against_model_config(config: ClipConfig, model_cfg: Mapping[str, Any]) -> None:
  """ValueError naming the first field where the tensors' architecture and the config disagree."""
  vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
  pairs = [
    ("embed_dim", model_cfg.get("embed_dim"), config.embed_dim),
    ("vision_cfg.image_size", vision.get("image_size"), config.vision.image_size),
    ("vision_cfg.patch_size", vision.get("patch_size"), config.vision.patch_size),
    ("vision_cfg.width", vision.get("width"), config.vision.width),
    ("vision_cfg.layers", vision.get("layers"), config.vision.layers),
    ("text_cfg.context_length", text.get("context_length"), config.text.context_length),
    ("text_cfg.vocab_size", text.get("vocab_size"), config.text.vocab_size),
    ("text_cfg.width", text.get("width"), config.text.width),
    ("text_cfg.layers", text.get("layers"), config.text.layers),
  ]
  for name, said, found in pairs:
    if isinstance(said, (list, tuple)) and len(set(said)) == 1:  # open_clip allows (height, width)
      said = said[0]
    if said is not None and said != found:
      raise ValueError(f"the model config says {name}={said} but the weights hold {found}: they do not belong together")
