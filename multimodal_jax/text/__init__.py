"""Text tokenizers with one interface: `encode(texts) -> int32 [n, context_length]`, padded with `pad_id`.

* `ClipBPETokenizer`: CLIP's byte-level BPE (OpenAI / open_clip vocabulary), written here; no torch.
* `HFJsonTokenizer`: any Hugging Face `tokenizer.json` (e.g. MiniLM's WordPiece) through the
  `tokenizers` library, with an attention mask.
* `WordTokenizer`: a word-level tokenizer for small template corpora (the embedded captions).

Over-long texts are truncated to `context_length`, keeping the end token (and the start token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from multimodal_jax.text.clip_bpe import ClipBPETokenizer, find_open_clip_vocab, shipped_vocab
from multimodal_jax.text.hf_json import HFJsonTokenizer
from multimodal_jax.text.words import WordTokenizer


@runtime_checkable
class Tokenizer(Protocol):
  """What every tokenizer here provides."""

  vocab_size: int
  context_length: int
  pad_id: int

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Texts (a sequence of `n` strings) -> int32 token ids `[n, context_length]`, padded with `pad_id`."""
    ...


__all__ = ["ClipBPETokenizer", "HFJsonTokenizer", "Tokenizer", "WordTokenizer", "find_open_clip_vocab", "shipped_vocab"]
