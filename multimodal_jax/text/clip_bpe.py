"""CLIP's byte-level BPE tokenizer (the algorithm of OpenAI's `simple_tokenizer.py`, as open_clip
uses it), written here so that tokenizing needs neither torch nor open_clip.

Steps per text: clean (optional ftfy `fix_text`, HTML unescaping twice, whitespace runs -> one
space, strip), lowercase, split into pieces with CLIP's pattern

    <start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+

(case-insensitive; implemented with `unicodedata` categories, so the `regex` package is not
needed: over every code point the split equals open_clip's except for characters unassigned in
Python's Unicode database (14.0 for Python 3.11), which `regex` may know as letters), map each piece's UTF-8 bytes to printable characters (`bytes_to_unicode`), mark the last
character with `</w>`, and merge pairs by rank from `bpe_simple_vocab_16e6.txt.gz` (the first
48,894 merges). Vocabulary: 256 byte characters, the same with `</w>`, one token per merge, then
`<start_of_text>` = 49406 and `<end_of_text>` = 49407 (49,408 ids). Rows are
`[49406, ids..., 49407, 0...]`; pad 0 is also the id of "!" (as in CLIP), so find the end of a
row by its end token (the row's largest id), not by counting non-zero ids.

ftfy: open_clip runs `ftfy.fix_text` first, which repairs mojibake ("cafÃ©" -> "café") and
normalizes some characters (e.g. curly quotes are kept, but "ﬁ" ligatures and full-width
punctuation are rewritten). With `fix_text=None` (default) it is used when `ftfy` is installed,
which gives open_clip's ids exactly; without it, ids differ only for text ftfy would change.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from multimodal_jax.errors import UserError
from multimodal_jax.text.words import as_text_list, pack

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # the merges OpenAI's CLIP uses (the file holds more): 49,408 ids in all
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CACHE_LIMIT = 100_000
# U+0345 (combining ypogegrammeni) case-folds to a letter, so under `regex`'s IGNORECASE it matches
# no alternative of CLIP's pattern and is skipped like whitespace; so it is here.
_SKIPPED = frozenset("\u0345")


def shipped_vocab() -> str:
  """Path of the copy of `bpe_simple_vocab_16e6.txt.gz` shipped in this package (`tokenizers/data/`,
  OpenAI's MIT-licensed file, its notice beside it): `ClipBPETokenizer`'s default vocabulary."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", VOCAB_FILE)


def find_open_clip_vocab() -> str:
  """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed open_clip package (found with
  `importlib.util.find_spec`, so neither open_clip nor torch is imported). Raises UserError if absent."""
  hint = "pass the vocabulary's path to ClipBPETokenizer, or `pip install open_clip_torch`"
  try:
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"CLIP's BPE vocabulary {VOCAB_FILE} was not found: open_clip is not installed; {hint}")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, VOCAB_FILE)
    if os.path.isfile(path):
      return path
  raise UserError(f"CLIP's BPE vocabulary {VOCAB_FILE} is missing from the installed open_clip; {hint}")


def bytes_to_unicode() -> dict[int, str]:
  """Byte value (0..255) -> a printable character: printable Latin-1 bytes map to themselves, the
  other 68 to chr(256 + n), so BPE never sees whitespace or control characters."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _is_letter(ch: str) -> bool:
  return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
  return unicodedata.category(ch)[0] == "N"


def _matches_at(text: str, i: int, literal: str) -> bool:
  """Case-insensitive (simple case folding) match of ASCII `literal` at `text[i:]`."""
  if i + len(literal) > len(text):
    return False
  for ch, want in zip(text[i : i + len(literal)], literal):
    if ch != want and ch.lower() != want and not (len(ch.casefold()) == 1 and ch.casefold() == want):
      return False
  return True


def split_pieces(text: str) -> list[str]:
  """CLIP's pre-tokenization of cleaned, lowercased text (see the module docstring)."""
  pieces = []
  i, n = 0, len(text)
  while i < n:
    ch = text[i]
    match = next((lit for lit in (START_OF_TEXT, END_OF_TEXT, *_CONTRACTIONS) if _matches_at(text, i, lit)), None)
    if match is not None:
      j = i + len(match)
    elif _is_letter(ch):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(ch):
      j = i + 1
    elif ch.isspace() or ch in _SKIPPED:
      i += 1
      continue
    else:
      j = i + 1
      while j < n and not (text[j].isspace() or text[j] in _SKIPPED or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


class ClipBPETokenizer:
  """CLIP's BPE: `encode(texts) -> int32 [n, context_length]` (`[49406, ..., 49407, 0, ...]`).

  Args:
    vocab_path: `bpe_simple_vocab_16e6.txt.gz` (gzip'd or plain text); None: the copy shipped in
      this package (`shipped_vocab()`); `find_open_clip_vocab()` finds the one inside an installed
      open_clip.
    context_length: tokens per row (77 for OpenAI CLIP). Longer texts are cut, keeping the start
      token first and the end token last.
    fix_text: run `ftfy.fix_text` first (open_clip does). None: when ftfy is installed. True
      without ftfy raises UserError.
  """

  def __init__(
    self, vocab_path: str | os.PathLike | None = None, context_length: int = 77, fix_text: bool | None = None
  ):
    if context_length < 2:
      raise ValueError(f"context_length {context_length} leaves no room for the start and end tokens (need >= 2)")
    self._ftfy_fix = None
    if fix_text or fix_text is None:
      try:
        import ftfy
      except ImportError:
        if fix_text:
          raise UserError("fix_text=True needs ftfy: `pip install ftfy` (or pass fix_text=False)") from None
      else:
        self._ftfy_fix = ftfy.fix_text
    merges = _read_merges(os.fspath(vocab_path) if vocab_path is not None else shipped_vocab())
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    vocab = list(self.byte_encoder.values())
    vocab += [c + "</w>" for c in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
    self.decoder: dict[int, str] = dict(enumerate(vocab))
    self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
    self.vocab_size = len(vocab)
    self.context_length = context_length
    self.pad_id = 0
    self.start_id = self.encoder[START_OF_TEXT]
    self.end_id = self.encoder[END_OF_TEXT]
    self._cache: dict[str, tuple[str, ...]] = {}

  def clean(self, text: str) -> str:
    """ftfy (if enabled), HTML-unescape twice, collapse whitespace, strip, lowercase."""
    if self._ftfy_fix is not None:
      text = self._ftfy_fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()

  def bpe(self, piece: str) -> tuple[str, ...]:
    """One byte-encoded piece -> its BPE tokens (the last one ends in `</w>`)."""
    if piece in (START_OF_TEXT, END_OF_TEXT):
      return (piece,)
    cached = self._cache.get(piece)
    if cached is not None:
      return cached
    word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(itertools.pairwise(word))
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, NUM_MERGES))
      if best not in self.bpe_ranks:
        break
      first, second = best
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    if len(self._cache) >= _CACHE_LIMIT:
      self._cache.clear()
    self._cache[piece] = word
    return word

  def tokenize(self, text: str) -> list[int]:
    """One text -> its BPE ids, without start/end tokens or truncation."""
    ids = []
    for piece in split_pieces(self.clean(text)):
      if piece not in (START_OF_TEXT, END_OF_TEXT):
        piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[tok] for tok in self.bpe(piece))
    return ids

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """`n` texts -> int32 `[n, context_length]`: start, ids, end, then pad 0 (see the class docstring)."""
    rows = [[self.start_id, *self.tokenize(t), self.end_id] for t in as_text_list(texts)]
    return pack(rows, self.context_length, self.pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Ids `[length]` -> text: the start token is dropped and decoding stops at the end token."""
    toks = []
    for i in np.asarray(ids).tolist():
      if i == self.end_id:
        break
      if i != self.start_id:
        toks.append(self.decoder[i])
    data = bytearray(self.byte_decoder[c] for c in "".join(toks))
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


def _read_merges(path: str) -> list[tuple[str, str]]:
  if not os.path.isfile(path):
    raise UserError(f"CLIP BPE vocabulary {path!r} does not exist: pass the path of {VOCAB_FILE}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise UserError(f"CLIP BPE vocabulary {path!r} is not a (gzip'd) UTF-8 text file: {e}") from None
  lines = text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
  merges = [tuple(line.split()) for line in lines]
  if len(merges) < NUM_MERGES or any(len(m) != 2 for m in merges):
    raise UserError(
      f"CLIP BPE vocabulary {path!r} is not {VOCAB_FILE}: expected {NUM_MERGES} merge lines of two symbols each"
    )
  return merges  # type: ignore[return-value]
