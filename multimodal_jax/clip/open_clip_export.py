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


# Options of open_clip's residual blocks, the same in both towers: (values with our blocks' math, what they mean).
_BLOCK_OPTIONS = {
  "ls_init_value": ((None,), "no layer scale"),
  "block_type": ((None, "default"), "open_clip's default residual block"),
  "qk_norm": ((False, None), "no q/k LayerNorm"),
  "scaled_cosine_attn": ((False, None), "dot-product attention"),
  "scale_heads": ((False, None), "no per-head scale"),
  "scale_attn_inner": ((False, None), "no inner attention LayerNorm"),
  "scale_attn": ((False, None), "no LayerNorm after attention"),
  "scale_fc": ((False, None), "no LayerNorm in the MLP"),
}


# open_clip's model config fields (its CLIPVisionCfg, CLIPTextCfg and CLIP's own arguments, as of
# open_clip 3.x) by what they do to the features of a ViT CLIP, so that every field a config sets is
# honoured or refused in one line, never ignored:
#   shape   read off the tensors as well, and checked against them (`check_against_model_config`);
#   free    no effect on the features of the towers we import: settings of training only
#           (patch_dropout), of outputs we do not return (output_tokens), of options that only act
#           together with a refused one (attn_pooler_heads without attentional_pool, eos_id without
#           pool_type='eos', the timm_* / hf_* / modern-text settings without their tower), and
#           final_ln_after_pool / pad_id, which are the identity where the pooling picks one token
#           and no class token is appended (the text tower does not even receive final_ln_after_pool);
#   ours    the values our CLIP computes; any other value is refused, naming what we compute.
# A field that is none of these (a newer open_clip's) is refused too: what it does is unknown here.
# quick_gelu, act_kwargs, norm_kwargs, init_logit_bias, head_width and heads are read by
# `options_from_model_config` itself.
_SHAPE = {
  "vision_cfg": ("layers", "width", "patch_size", "image_size", "mlp_ratio", "in_chans"),
  "text_cfg": ("context_length", "vocab_size", "width", "layers", "mlp_ratio"),
}
_FREE = {
  "model_cfg": ("init_logit_scale", "cast_dtype", "output_dict"),
  "vision_cfg": (
    "patch_dropout", "output_tokens", "final_ln_after_pool", "image_seq_len", "attn_pooler_queries",
    "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
    "timm_drop_path", "timm_model_kwargs",
  ),
  "text_cfg": (
    "output_tokens", "final_ln_after_pool", "pad_id", "eos_id", "bos_id", "tiktoken_name", "hf_model_pretrained",
    "hf_proj_type", "hf_pooler_type", "hf_model_config", "attention_mode", "pos_embed", "rope_temperature",
    "mlp_type", "norm_type", "norm_eps", "attn_gated", "pre_norm", "norm_placement", "zero_init_residual",
    "reg_tokens", "value_residual", "attention_bias", "mlp_bias", "gate_bias",
  ),
}  # fmt: skip
# field: (the values we compute, what that is); None stands for "not set".
_OURS = {
  "model_cfg": {
    "custom_text": ((False, None), "the text tower at the top level (open_clip's CLIP, not CustomTextCLIP)"),
    "multimodal_cfg": ((None,), "no text decoder (CoCa's multimodal_cfg)"),
    "nonscalar_logit_scale": ((False, True, None), "a logit scale of shape () or [1]"),
  },
  "vision_cfg": {
    "pool_type": (("tok", None), "the class token's features"),
    "attentional_pool": ((False, None), "no attentional pooler"),
    "global_average_pool": ((False, None), "the class token's features"),
    "no_ln_pre": ((False, None), "a LayerNorm before the blocks (ln_pre)"),
    "pos_embed_type": (("learnable", "sin_cos_2d", None), "a positional embedding tensor"),
    **_BLOCK_OPTIONS,
    "timm_model_name": ((None, ""), "open_clip's own VisionTransformer, not a timm tower"),
  },
  "text_cfg": {
    "text_arch": (("clip", None), "open_clip's classic text transformer"),
    "variable_text": ((False, None), "fixed-length text"),
    "pool_type": (("argmax", None), "the end-of-text token's features (argmax pooling)"),
    "no_causal_mask": ((False, None), "a causal text mask"),
    "embed_cls": ((False, None), "no appended class token"),
    "proj_type": (("linear", None), "a linear text projection"),
    "proj_bias": ((False, None), "a text projection without bias"),
    **_BLOCK_OPTIONS,
    "hf_model_name": ((None, ""), "open_clip's own text transformer, not a Hugging Face one"),
    "hf_tokenizer_name": ((None, ""), "text tokenised by CLIP's BPE"),
    "tokenizer_type": ((None, ""), "text tokenised by CLIP's BPE"),
    "tokenizer_mode": ((None,), "text tokenised by CLIP's BPE"),
    "tokenizer_kwargs": ((None, {}, {"clean": "lower"}), "CLIP's BPE with its default cleaning (lower)"),
  },
}
_LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm default, and layers.layer_norm's
_TOP_LEVEL_READ = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_bias")
_TOWER_READ = {
  "vision_cfg": ("head_width", "act_kwargs", "norm_kwargs"),
  "text_cfg": ("heads", "act_kwargs", "norm_kwargs"),
}


def read_model_config(weights: str | os.PathLike) -> dict[str, Any] | None:
  """The open_clip model config stored beside a weights file, if any: `NAME.json` next to
  `NAME.safetensors` / `NAME.bin` (as `save_open_clip` writes), or `open_clip_config.json` in the
  same folder (open_clip's pretrained folders and Hub repos). Its `model_cfg` entry when it has one."""
  raw, _ = _model_config_file(weights)
  if not isinstance(raw, dict):
    return None
  return raw.get("model_cfg", raw)


def read_preprocess_config(weights: str | os.PathLike) -> dict[str, Any] | None:
  """The `preprocess_cfg` of the model config beside a weights file (a Hub repo's
  open_clip_config.json: the image mean / std, interpolation and resize mode open_clip evaluates
  with), or None."""
  raw, _ = _model_config_file(weights)
  value = raw.get("preprocess_cfg") if isinstance(raw, dict) else None
  return value if isinstance(value, dict) else None


def model_config_path(weights: str | os.PathLike) -> str | None:
  """Which file `read_model_config` reads for `weights` (None: there is none)."""
  path = os.fspath(weights)
  folder = os.path.dirname(os.path.abspath(path))
  candidates = [os.path.splitext(path)[0] + ".json", os.path.join(folder, "open_clip_config.json")]
  return next((c for c in candidates if os.path.isfile(c)), None)


def _model_config_file(weights: str | os.PathLike) -> tuple[Any, str | None]:
  candidate = model_config_path(weights)
  if candidate is None:
    return None, None
  try:
    with open(candidate) as f:
      return json.load(f), candidate
  except (OSError, ValueError) as e:
    raise ValueError(f"{candidate} is not a readable JSON model config ({e})") from None


def options_from_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The options the tensors cannot tell, with open_clip's defaults: activation (`quick_gelu` and
  the towers' `act_kwargs`) and head counts. A field whose value our CLIP does not compute (see
  `_OURS`) or that this module does not know is a one-line ValueError naming it."""
  sections = {"model_cfg": model_cfg}
  for tower in ("vision_cfg", "text_cfg"):
    value = model_cfg.get(tower) or {}
    mapping = isinstance(value, Mapping)  # (a config error like the others: ValueError for the callers)
    if not mapping:
      raise ValueError(f"the model config's {tower} is a {type(value).__name__}, not a mapping")
    sections[tower] = value
  for section, fields in sections.items():
    known = (
      set(_SHAPE.get(section, ())) | set(_FREE.get(section, ())) | set(_OURS.get(section, {}))
      | set(_TOWER_READ.get(section, ())) | (set(_TOP_LEVEL_READ) if section == "model_cfg" else set())
    )  # fmt: skip
    for key, value in fields.items():
      name = key if section == "model_cfg" else f"{section}.{key}"
      if key not in known:
        raise ValueError(
          f"the model config sets {name}={value!r}, a field multimodal_jax's CLIP does not know (it cannot tell "
          "whether open_clip computes other features with it)"
        )
      allowed = _OURS.get(section, {}).get(key)
      if allowed is not None and value not in allowed[0]:
        raise ValueError(
          f"the model config sets {name}={value!r}, which multimodal_jax's CLIP does not compute "
          f"(it computes {allowed[0][0]!r}: {allowed[1]})"
        )
  vision, text = sections["vision_cfg"], sections["text_cfg"]
  resnet = isinstance(vision.get("layers"), (list, tuple))  # open_clip's ModifiedResNet takes 4 stage depths
  if resnet:
    raise ValueError(
      f"the model config sets vision_cfg.layers={list(vision['layers'])!r}: a ModifiedResNet image tower, "
      "which multimodal_jax's CLIP does not compute (it computes a ViT)"
    )
  quick_gelu = bool(model_cfg.get("quick_gelu", False))
  activations = {tower: _activation(sections[tower], tower, quick_gelu) for tower in ("vision_cfg", "text_cfg")}
  for tower in ("vision_cfg", "text_cfg"):
    _check_norm(sections[tower], tower)
  if activations["vision_cfg"] != activations["text_cfg"]:
    tower = "text_cfg" if sections["text_cfg"].get("act_kwargs") else "vision_cfg"
    raise ValueError(
      f"the model config sets {tower}.act_kwargs={sections[tower].get('act_kwargs')!r} for one tower only: its "
      f"activations differ (vision {activations['vision_cfg']}, text {activations['text_cfg']}), which "
      "multimodal_jax's CLIP does not compute (one activation for both towers)"
    )
  width = vision.get("width", 768)
  return {
    "quick_gelu": quick_gelu,
    "activation": activations["vision_cfg"],
    "vision_heads": max(width // vision.get("head_width", 64), 1),
    "text_heads": text.get("heads", 8),
  }


def _activation(tower_cfg: Mapping[str, Any], tower: str, quick_gelu: bool) -> str:
  """Our activation name for a tower: QuickGELU, or nn.GELU with its `act_kwargs` (approximate)."""
  kwargs = tower_cfg.get("act_kwargs") or {}
  if not isinstance(kwargs, Mapping) or set(kwargs) - {"approximate"}:
    raise ValueError(
      f"the model config sets {tower}.act_kwargs={kwargs!r}, which multimodal_jax's CLIP does not compute "
      "(it takes only GELU's approximate: 'none' or 'tanh')"
    )
  approximate = kwargs.get("approximate", "none")
  if quick_gelu:
    if kwargs:  # open_clip would pass them to QuickGELU, which takes none
      raise ValueError(f"the model config sets {tower}.act_kwargs={dict(kwargs)!r} with quick_gelu, which takes none")
    return "quick_gelu"
  if approximate not in ("none", "tanh"):
    raise ValueError(
      f"the model config sets {tower}.act_kwargs={dict(kwargs)!r}, which multimodal_jax's CLIP does not compute "
      "(GELU's approximate is 'none' or 'tanh')"
    )
  return "gelu_tanh" if approximate == "tanh" else "gelu"


def _check_norm(tower_cfg: Mapping[str, Any], tower: str) -> None:
  kwargs = tower_cfg.get("norm_kwargs") or {}
  ok = (
    isinstance(kwargs, Mapping) and not set(kwargs) - {"eps"} and kwargs.get("eps", _LAYER_NORM_EPS) == _LAYER_NORM_EPS
  )
  if not ok:
    raise ValueError(
      f"the model config sets {tower}.norm_kwargs={kwargs!r}, which multimodal_jax's CLIP does not compute "
      f"(its LayerNorms have eps={_LAYER_NORM_EPS:g} and nothing else)"
    )


def check_against_model_config(config: ClipConfig, model_cfg: Mapping[str, Any]) -> None:
  """ValueError naming the first field where the tensors' architecture and the config disagree."""
  vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}

  def hidden(tower: Mapping[str, Any], width: int | None) -> int | None:
    ratio = tower.get("mlp_ratio")
    return None if ratio is None or width is None else int(width * ratio)

  bias = model_cfg.get("init_logit_bias")
  pairs = [
    ("embed_dim", model_cfg.get("embed_dim"), config.embed_dim),
    ("vision_cfg.image_size", vision.get("image_size"), config.vision.image_size),
    ("vision_cfg.patch_size", vision.get("patch_size"), config.vision.patch_size),
    ("vision_cfg.width", vision.get("width"), config.vision.width),
    ("vision_cfg.layers", vision.get("layers"), config.vision.layers),
    ("vision_cfg.in_chans", vision.get("in_chans"), config.vision.channels),
    ("vision_cfg MLP width", hidden(vision, vision.get("width")), int(config.vision.width * config.vision.mlp_ratio)),
    ("text_cfg.context_length", text.get("context_length"), config.text.context_length),
    ("text_cfg.vocab_size", text.get("vocab_size"), config.text.vocab_size),
    ("text_cfg.width", text.get("width"), config.text.width),
    ("text_cfg.layers", text.get("layers"), config.text.layers),
    ("text_cfg MLP width", hidden(text, text.get("width")), int(config.text.width * config.text.mlp_ratio)),
    ("a logit bias", None if bias is None else "yes", "yes" if config.init_logit_bias is not None else "no"),
  ]
  for name, said, found in pairs:
    if isinstance(said, (list, tuple)) and len(set(said)) == 1:  # open_clip allows (height, width)
      said = said[0]
    if said is not None and said != found:
      raise ValueError(f"the model config says {name}={said} but the weights hold {found}: they do not belong together")
  for tower, ours in (("vision_cfg", config.vision), ("text_cfg", config.text)):
    if ours.width % ours.heads:
      raise ValueError(f"the model config's {tower} gives {ours.heads} heads, which do not divide width {ours.width}")
