"""A word-level tokenizer for small template corpora (the embedded captions), and the packing
helpers every tokenizer here shares.

Ids: 0 = pad, 1 = start, 2 = end, 3 = unknown, then the vocabulary's words in order. A text is
lowercased and split into maximal runs of letters and digits (everything else separates words),
then encoded as `[start, words..., end, pad...]`. The end token is always the last non-pad token,
which is where the CLIP text tower pools.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD_ID, START_ID, END_ID, UNKNOWN_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unknown>")
_WORD = re.compile(r"[^\W_]+")  # letters and digits (Unicode); '_' and everything else separate words


def as_text_list(texts: str | Sequence[str]) -> list[str]:
  """A single string becomes a list of one; anything else must be a sequence of strings."""
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  for t in texts:
    if not isinstance(t, str):
      raise TypeError(f"texts must be strings, got {type(t).__name__}: {t!r}")
  return texts


def pack(rows: Sequence[Sequence[int]], context_length: int, pad_id: int) -> np.ndarray:
  """Token-id rows (each already `[start?, ..., end]`) -> int32 `[n, context_length]`.

  Rows longer than `context_length` are cut to it with their last token (the end token) kept in
  the last position; shorter ones are padded with `pad_id` on the right.
  """
  out = np.full((len(rows), context_length), pad_id, np.int32)
  for i, row in enumerate(rows):
    row = list(row)
    if len(row) > context_length:
      row = row[: context_length - 1] + row[-1:]
    out[i, : len(row)] = row
  return out


def split_words(text: str) -> list[str]:
  """Lowercased runs of letters/digits: "A 7, hand-written!" -> ['a', '7', 'hand', 'written']."""
  return _WORD.findall(text.lower())


class WordTokenizer:
  """Word-level tokenizer over a fixed vocabulary (words are looked up after `split_words`).

  `encode(texts) -> int32 [n, context_length]`: `[1 (start), word ids..., 2 (end), 0 (pad)...]`,
  unknown words -> 3. Texts longer than the context keep their first `context_length - 2` words.
  """

  def __init__(self, vocabulary: Sequence[str], context_length: int):
    if context_length < 2:
      raise ValueError(f"context_length {context_length} leaves no room for the start and end tokens (need >= 2)")
    vocabulary = list(vocabulary)
    seen: set[str] = set()
    for word in vocabulary:
      if split_words(word) != [word]:
        raise ValueError(f"vocabulary word {word!r} can never occur: words are lowercase runs of letters and digits")
      if word in seen:
        raise ValueError(f"vocabulary word {word!r} appears twice")
      seen.add(word)
    self.vocabulary: tuple[str, ...] = tuple(vocabulary)
    self.context_length = context_length
    self.pad_id, self.start_id, self.end_id, self.unknown_id = PAD_ID, START_ID, END_ID, UNKNOWN_ID
    self.vocab_size = len(SPECIAL_TOKENS) + len(vocabulary)
    self._ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(vocabulary)}

  @classmethod
  def from_texts(
    cls, texts: Iterable[str], context_length: int, min_count: int = 1, max_words: int | None = None
  ) -> WordTokenizer:
    """Vocabulary = words occurring at least `min_count` times, most frequent first (ties
    alphabetical, so the ids depend only on the texts), at most `max_words` of them."""
    counts = collections.Counter(w for t in as_text_list(list(texts)) for w in split_words(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls(words[:max_words] if max_words is not None else words, context_length)

  def tokenize(self, text: str) -> list[int]:
    """One text -> its word ids, without start/end tokens or truncation."""
    return [self._ids.get(w, UNKNOWN_ID) for w in split_words(text)]

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """`n` texts -> int32 `[n, context_length]` (see the class docstring)."""
    rows = [[START_ID, *self.tokenize(t), END_ID] for t in as_text_list(texts)]
    return pack(rows, self.context_length, PAD_ID)

  def decode(self, ids: Sequence[int]) -> str:
    """Ids `[length]` -> the words joined by spaces (special tokens dropped, unknowns as `<unknown>`)."""
    words = []
    for i in np.asarray(ids).tolist():
      if i == UNKNOWN_ID:
        words.append(SPECIAL_TOKENS[UNKNOWN_ID])
      elif i >= len(SPECIAL_TOKENS):
        words.append(self.vocabulary[i - len(SPECIAL_TOKENS)])
    return " ".join(words)
