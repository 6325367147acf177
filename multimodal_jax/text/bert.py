"""A BERT encoder (post-LN, as Hugging Face's BertModel) and sentence embeddings as
sentence-transformers computes them: mean of the token features over the attention mask, then
L2-normalized (all-MiniLM-L6-v2's Pooling + Normalize modules).

`BertConfig()` is all-MiniLM-L6-v2 (hidden 384, 6 layers, 12 heads, MLP 1536, vocab 30522, 512
positions); `multimodal_jax.text.minilm.load_minilm()` returns its config, params and tokenizer.

Params (logical axis names in brackets; with `scan=True` the six `layer_i` are one `layers` whose
leaves have a leading `[layers]` axis):

    word_embeddings [vocab, embed]      position_embeddings [length, embed]
    token_type_embeddings [None, embed] embeddings_ln/{scale, bias} [norm]
    layer_i/attention/{query, key, value}/kernel [embed, heads, kv], bias [heads, kv]
    layer_i/attention/out/kernel [heads, kv, embed], bias [embed]
    layer_i/attention_ln, layer_i/output_ln: {scale, bias} [norm]
    layer_i/intermediate/kernel [embed, mlp], bias [mlp]; layer_i/output/kernel [mlp, embed], bias [embed]

A locked ("LiT") text tower: load the params once and keep them out of the trainable tree, e.g.
close over them or pass them to the loss function as a constant
(`tower.apply({"params": frozen_params}, ids, mask)`), so no optimizer (and no weight decay)
touches them. `MiniLMTextTower` also stops gradients at its output (`frozen=True`), so nothing is
back-propagated into the encoder even if its params do end up in a differentiated tree; keep them
out of the optimizer all the same, since decoupled weight decay changes params whose gradient is 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from multimodal_jax.arrays import l2_normalize
from multimodal_jax.layers import dense, layer_norm


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Defaults: all-MiniLM-L6-v2."""

  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"  # BERT's "gelu" is the exact erf form; "gelu_tanh": the tanh approximation
  scan: bool = False  # True: the layers under nn.scan (params with a leading [layers] axis)

  def __post_init__(self):
    if self.hidden % self.heads:
      raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
    if self.activation not in ("gelu", "gelu_tanh"):
      raise ValueError(f"activation {self.activation!r}: BERT takes gelu or gelu_tanh")


def _param_init(stddev: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with a padding mask. `x [b, L, hidden]`, `mask_bias [b, 1, 1, L]`
  (0 for real tokens, a large negative number for padding) -> `[b, L, hidden]` (before the residual)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask_bias: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    head_dim = cfg.hidden // cfg.heads

    def proj(name):
      return nn.DenseGeneral(
        (cfg.heads, head_dim),
        kernel_init=_param_init(0.02, ("embed", "heads", "kv")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")),
        name=name,
      )(x)  # [b, L, heads, head_dim]

    q, k, v = proj("query"), proj("key"), proj("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
    logits = logits.astype(jnp.float32) + mask_bias
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(
      cfg.hidden,
      axis=(-2, -1),
      kernel_init=_param_init(0.02, ("heads", "kv", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      name="out",
    )(out)


class BertLayer(nn.Module):
  """Post-LN block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x)). `[b, L, hidden]` -> same.

  Returns `(x, None)` so that it can run under nn.scan.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask_bias: jnp.ndarray):
    cfg = self.config
    x = layer_norm("attention_ln", cfg.layer_norm_eps)(x + BertSelfAttention(cfg, name="attention")(x, mask_bias))
    h = nn.gelu(
      dense(cfg.intermediate, ("embed", "mlp"), name="intermediate")(x), approximate=cfg.activation == "gelu_tanh"
    )
    x = layer_norm("output_ln", cfg.layer_norm_eps)(x + dense(cfg.hidden, ("mlp", "embed"), name="output")(h))
    return x, None


def mean_pool(features: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean of `features [b, L, d]` over the positions where `mask [b, L]` is nonzero -> `[b, d]`
  (a row with an all-zero mask gives zeros, as in sentence-transformers' clamp at 1e-9)."""
  m = mask.astype(features.dtype)[..., None]
  return (features * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def sentence_embedding(features: jnp.ndarray, mask: jnp.ndarray, normalize: bool = True) -> jnp.ndarray:
  """Token features `[b, L, d]` and mask `[b, L]` -> `[b, d]`: masked mean, L2-normalized unless
  `normalize=False` (what all-MiniLM-L6-v2 does)."""
  pooled = mean_pool(features, mask)
  return l2_normalize(pooled) if normalize else pooled


class BertModel(nn.Module):
  """`__call__(input_ids [b, L], attention_mask [b, L], token_type_ids=None) -> features [b, L, hidden]`.

  `attention_mask` is 1 on real tokens and 0 on padding (None: all real); `token_type_ids`
  default to 0. `L` may be at most `cfg.max_positions`. No dropout: meant for inference and for
  frozen towers.
  """

  config: BertConfig

  def setup(self):
    cfg = self.config
    self.word_embeddings = self.param(
      "word_embeddings", _param_init(0.02, ("vocab", "embed")), (cfg.vocab_size, cfg.hidden)
    )
    self.position_embeddings = self.param(
      "position_embeddings", _param_init(0.02, ("length", "embed")), (cfg.max_positions, cfg.hidden)
    )
    self.token_type_embeddings = self.param(
      "token_type_embeddings", _param_init(0.02, (None, "embed")), (cfg.type_vocab_size, cfg.hidden)
    )
    self.embeddings_ln = layer_norm("embeddings_ln", cfg.layer_norm_eps)
    if cfg.scan:
      stack = nn.scan(
        BertLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=cfg.layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      self.stack = stack(cfg, name="layers")
    else:
      self.blocks = [BertLayer(cfg, name=f"layer_{i}") for i in range(cfg.layers)]

  def features(
    self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None, token_type_ids: jnp.ndarray | None = None
  ) -> jnp.ndarray:
    """Token features `[b, L, hidden]` (the last hidden state of Hugging Face's BertModel)."""
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_positions:
      raise ValueError(f"input has {length} tokens but the model has {cfg.max_positions} positions: truncate it")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    x = (
      jnp.take(self.word_embeddings, input_ids, axis=0)
      + self.position_embeddings[None, :length]
      + jnp.take(self.token_type_embeddings, token_type_ids, axis=0)
    )
    x = self.embeddings_ln(x)
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    if cfg.scan:
      x, _ = self.stack(x, mask_bias)
    else:
      for block in self.blocks:
        x, _ = block(x, mask_bias)
    return x

  def __call__(
    self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None, token_type_ids: jnp.ndarray | None = None
  ) -> jnp.ndarray:
    return self.features(input_ids, attention_mask, token_type_ids)

  def encode(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray, normalize: bool = True) -> jnp.ndarray:
    """Sentence embeddings `[b, hidden]`: masked mean of the features, L2-normalized by default."""
    return sentence_embedding(self.features(input_ids, attention_mask), attention_mask, normalize)


class MiniLMTextTower(BertModel):
  """A (locked) text tower: `(input_ids [b, L], mask [b, L]) -> sentence features [b, hidden]`.

  Same params as `BertModel` (so `load_minilm()`'s params apply directly). `normalize`: L2-normalize
  the pooled features (all-MiniLM-L6-v2's sentence embedding); set False to feed a trainable
  projection. `frozen`: stop gradients at the output (see the module docstring).
  """

  normalize: bool = True
  frozen: bool = True

  def __call__(self, input_ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:  # type: ignore[override]
    out = self.encode(input_ids, mask, self.normalize)
    return jax.lax.stop_gradient(out) if self.frozen else out
