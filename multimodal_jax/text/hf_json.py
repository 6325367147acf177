"""Any Hugging Face `tokenizer.json` (WordPiece, BPE, Unigram) through the `tokenizers` library
(an optional dependency; no torch, no transformers, no network).

For BERT-style files such as all-MiniLM-L6-v2's, rows are `[CLS] ... [SEP]` then pad 0, with an
attention mask (1 on real tokens, 0 on padding).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from multimodal_jax.errors import UserError
from multimodal_jax.text.words import as_text_list


class HFJsonTokenizer:
  """`encode(texts) -> int32 [n, context_length]`; `encode_with_mask(texts) -> (ids, mask)`.

  The file's own padding and truncation settings are replaced: rows are padded to exactly
  `context_length` with `pad_id` (default: the file's pad id, else the id of "[PAD]", else 0), and
  longer texts are truncated by the library, which keeps the post-processor's special tokens
  (`[CLS]` first, `[SEP]` last for BERT).
  """

  def __init__(self, tokenizer_json_path: str | os.PathLike, context_length: int, pad_id: int | None = None):
    try:
      from tokenizers import Tokenizer
    except ImportError:
      raise UserError("HFJsonTokenizer needs the `tokenizers` package: `pip install tokenizers`") from None
    path = os.fspath(tokenizer_json_path)
    if not os.path.isfile(path):
      raise UserError(f"tokenizer file {path!r} does not exist: pass the path of a Hugging Face tokenizer.json")
    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 (the library raises a bare Exception on malformed files)
      raise UserError(f"{path!r} is not a readable Hugging Face tokenizer.json: {e}") from None
    special = tok.num_special_tokens_to_add(is_pair=False)
    if context_length <= special:
      raise ValueError(f"context_length {context_length} leaves no room for text after {special} special tokens")
    if pad_id is None:
      padding = tok.padding
      pad_id = padding["pad_id"] if padding else tok.token_to_id("[PAD]")
      pad_id = 0 if pad_id is None else pad_id
    pad_token = tok.id_to_token(pad_id) or "[PAD]"
    tok.no_padding()
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    self._tokenizer = tok
    self.path = path
    self.context_length = context_length
    self.pad_id = int(pad_id)
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def encode_with_mask(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`n` texts -> (ids int32 `[n, context_length]`, attention mask int32 `[n, context_length]`)."""
    texts = as_text_list(texts)
    if not texts:
      empty = np.zeros((0, self.context_length), np.int32)
      return empty, empty.copy()
    encodings = self._tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """`n` texts -> ids int32 `[n, context_length]` padded with `pad_id`."""
    return self.encode_with_mask(texts)[0]

  def decode(self, ids: Sequence[int]) -> str:
    """Ids `[length]` -> text, special tokens dropped."""
    return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)
