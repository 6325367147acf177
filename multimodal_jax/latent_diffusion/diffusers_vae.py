"""diffusers `AutoencoderKL` weights -> `multimodal_jax.latent_diffusion.autoencoder_kl.AutoencoderKL` params.

  cfg, params = load_diffusers_vae("path/to/vae")      # config.json + diffusion_pytorch_model.safetensors
  mean, logvar = AutoencoderKL(cfg).apply({"params": params}, images, method=AutoencoderKL.encode)

A diffusers model folder is read with `safetensors.numpy` (no torch); a `.bin` file needs torch and is loaded
with `weights_only=True`. Conv kernels go OIHW -> HWIO, linear weights (out, in) -> (in, out). The mid block's
attention may be named `to_q / to_k / to_v / to_out.0` (diffusers >= 0.14) or `query / key / value / proj_attn`
(older saves), with linear or 1x1-conv weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from multimodal_jax.convert import torch_files
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}


class StateDictError(UserError, ValueError):
  """A state dict that does not fit the config: a tensor missing, mis-shaped or unexpected."""


def expected_shapes(config: AutoencoderKLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our param path -> shape, for every parameter of `AutoencoderKL(config)` (no arrays are made)."""
  f = config.downsampling_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  boxed = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _our_path(torch_key: str) -> tuple[str, ...]:
  """`encoder.down_blocks.0.resnets.1.conv1.weight` -> (encoder, down_blocks_0, resnets_1, conv1, weight)."""
  parts: list[str] = []
  for part in torch_key.split("."):
    if part.isdigit() and parts:
      if parts[-1] != "to_out":  # to_out.0 (to_out.1 is a parameterless dropout) is our to_out
        parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(_LEGACY_ATTENTION.get(part, part))
  return tuple(parts)


def torch_name(path: tuple[str, ...]) -> str:
  """Our param path -> its diffusers state-dict key (the `.weight` / `.bias` names of today's diffusers)."""
  out = []
  for part in path[:-1]:
    m = re.match(r"^(.*)_(\d+)$", part)
    out.append(f"{m.group(1)}.{m.group(2)}" if m else ("to_out.0" if part == "to_out" else part))
  out.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(out)


def _to_ours(value: np.ndarray, target: tuple[int, ...]) -> np.ndarray | None:
  """A torch tensor in our layout, or None if its shape cannot give `target`."""
  value = np.asarray(value, np.float32)
  if len(target) == 4 and value.ndim == 4:  # conv OIHW -> HWIO
    value = value.transpose(2, 3, 1, 0)
  elif len(target) == 2:  # linear (out, in), or a 1x1 conv (out, in, 1, 1) -> (in, out)
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    if value.ndim != 2:
      return None
    value = value.T
  return value if value.shape == target else None


def convert_autoencoder_kl(state_dict: Mapping[str, Any], config: AutoencoderKLConfig) -> dict[str, Any]:
  """A diffusers AutoencoderKL state dict (numpy arrays or torch tensors) -> our params (nested numpy dict).

  Raises StateDictError (a UserError) naming the first unexpected, mis-shaped or missing tensor.
  """
  expected = expected_shapes(config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state_dict.items():
    parts = list(_our_path(key))
    if parts and parts[-1] == "weight":
      parent = tuple(parts[:-1])
      parts[-1] = "scale" if parent + ("scale",) in expected else "kernel"
    path = tuple(parts)
    if path not in expected:
      raise StateDictError(
        f"state dict has unexpected tensor {key!r}: AutoencoderKL with this config has no such parameter "
        "(check the config matches the weights)"
      )
    if path in flat:
      raise StateDictError(f"state dict has tensor {key!r} twice (under its current and its legacy name)")
    shape = tuple(np.shape(value))
    converted = _to_ours(_numpy(value), expected[path])
    if converted is None:
      raise StateDictError(
        f"state dict tensor {key!r} has shape {shape}, which does not fit the parameter "
        f"{'/'.join(path)} of shape {expected[path]}: the config does not match the weights"
      )
    flat[path] = converted
  for path in expected:
    if path not in flat:
      raise StateDictError(f"state dict lacks tensor {torch_name(path)!r} (parameter {'/'.join(path)})")
  params: dict[str, Any] = {}
  for path, value in flat.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return params


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy type: go through float32
    return value.detach().cpu().float().numpy()
  return np.asarray(value)


def read_diffusers_vae_config(path: str | os.PathLike) -> tuple[AutoencoderKLConfig, str, str]:
  """(config, folder, weights file) of a diffusers AutoencoderKL folder or Hub name, without reading the
  weights: the checks a run makes before it loads any data. UserError for a missing folder, config.json or
  weights file, and for a config.json that is not JSON."""
  from multimodal_jax.convert import hf_hub

  path = hf_hub.local_path(path, "diffusers_vae", "autoencoder_from")
  if not os.path.isdir(path):
    raise UserError(f"no diffusers model folder at {path!r}: pass the folder holding config.json and the weights")
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise UserError(f"{path!r} has no {CONFIG_FILE}: pass a diffusers AutoencoderKL folder (save_pretrained output)")
  try:
    with open(config_path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{config_path} is not valid JSON ({e.msg} at line {e.lineno}); rewrite or replace it") from e
  config = AutoencoderKLConfig.from_diffusers(raw)
  weights = next((os.path.join(path, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), None)
  if weights is None:
    raise UserError(f"{path!r} has no {' or '.join(WEIGHT_FILES)}: the folder holds no AutoencoderKL weights")
  return config, path, weights


def load_diffusers_vae(path: str | os.PathLike) -> tuple[AutoencoderKLConfig, dict[str, Any]]:
  """(config, params) from a diffusers AutoencoderKL folder (`save_pretrained`, or a pipeline's `vae/`),
  or from a Hub name `hf-hub:ORG/NAME[@REVISION]` in the local Hugging Face cache: a VAE repo, or a
  pipeline's `vae/` subfolder (`convert.hf_hub`, offline)."""
  config, _, weights = read_diffusers_vae_config(path)
  if weights.endswith(".safetensors"):
    state_dict = torch_files.read_safetensors(weights)
  else:
    state_dict = torch_files.load(weights)  # torch.save files, read without PyTorch
  return config, convert_autoencoder_kl(state_dict, config)


def _to_torch(value: np.ndarray) -> np.ndarray:
  """Our layout -> diffusers': HWIO conv -> OIHW; (in, out) linear -> (out, in); vectors as they are."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    return np.array(value.transpose(3, 2, 0, 1), order="C")
  if value.ndim == 2:
    return np.array(value.T, order="C")
  return np.array(value, order="C")


def export_autoencoder_kl(params: Mapping[str, Any], config: AutoencoderKLConfig) -> dict[str, np.ndarray]:
  """The inverse of `convert_autoencoder_kl`: our params -> a diffusers AutoencoderKL state dict
  (today's names: `to_q` / `to_out.0`, attention projections as linear weights)."""
  expected = expected_shapes(config)
  flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise StateDictError(f"the params lack {'/'.join(missing[0])}: they are not an AutoencoderKL of this config")
  return {torch_name(path): _to_torch(flat[path]) for path in expected}


def diffusers_config(config: AutoencoderKLConfig) -> dict[str, Any]:
  """The diffusers `config.json` of `config` (what `AutoencoderKL.from_pretrained` reads)."""
  blocks = list(config.block_out_channels)
  out = {
    "_class_name": "AutoencoderKL",
    "in_channels": config.in_channels,
    "out_channels": config.out_channels,
    "latent_channels": config.latent_channels,
    "block_out_channels": blocks,
    "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
    "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
    "layers_per_block": config.layers_per_block,
    "norm_num_groups": config.norm_num_groups,
    "act_fn": "silu",
    "mid_block_add_attention": config.mid_block_add_attention,
    "use_quant_conv": config.use_quant_conv,
    "use_post_quant_conv": config.use_post_quant_conv,
  }
  if config.scaling_factor is not None:
    out["scaling_factor"] = config.scaling_factor
  if config.shift_factor is not None:
    out["shift_factor"] = config.shift_factor
  return out


def save_diffusers_vae(directory: str | os.PathLike, params: Mapping[str, Any], config: AutoencoderKLConfig) -> None:
  """Writes a diffusers AutoencoderKL folder (`config.json` + `diffusion_pytorch_model.safetensors`)
  that diffusers' AutoencoderKL loads from that local folder, and `load_diffusers_vae` reads."""
  from safetensors.numpy import save_file

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  save_file(export_autoencoder_kl(params, config), os.path.join(directory, WEIGHT_FILES[0]))
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(diffusers_config(config), f, indent=2)
