"""Webdataset tar shards located and indexed: brace patterns expanded to shard paths, and each shard's
member names, data offsets and sizes read from its tar headers once (no member data read), grouped
into samples by key and cached beside the data, so that `data.wds` reads any sample by offset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence

import numpy as np
from etils import epath

from multimodal_jax import files
from multimodal_jax.errors import UserError

INDEX_VERSION = 1  # bump when the index layout changes: old cached indexes are then rebuilt


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then every extension


_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips (`__index__` and the like)


_DEPTH = {"{": 1, "}": -1}


def expand_braces(pattern: str) -> list[str]:
  """Shard paths of a pattern: `{000..099}` zero-padded numeric ranges, `{a,b}` alternatives (nested,
  several per pattern) and `::`-separated lists of patterns, in order."""
  return [path for part in pattern.split("::") if part.strip() for path in _expand(part.strip())]


def _expand(text: str) -> list[str]:
  start, depth = text.find("{"), 0
  if start < 0:
    return [text]
  for end in range(start, len(text)):
    depth += _DEPTH.get(text[end], 0)
    if depth == 0:
      break
  else:
    raise UserError(f"wds:{text} has an unclosed '{{': write ranges as {{000000..000099}} and lists as {{a,b}}")
  tails = _expand(text[end + 1 :])
  return [text[:start] + choice + tail for choice in _choices(text[start + 1 : end]) for tail in tails]


def _choices(inner: str) -> list[str]:
  numbers = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
  if numbers:
    a, b = numbers.groups()
    width = max(len(a), len(b)) if a[0] == "0" or b[0] == "0" else 0
    step = 1 if int(b) >= int(a) else -1
    return [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]
  parts, depth, last = [], 0, 0
  for i, c in enumerate(inner + ","):
    depth += _DEPTH.get(c, 0)
    if c == "," and depth == 0:
      parts.append(inner[last:i])
      last = i + 1
  return [choice for part in parts for choice in _expand(part)]


def _open(path: str):
  return open(path, "rb") if "://" not in path else epath.Path(path).open("rb")


def list_shards(pattern: str | Sequence[str]) -> list[str]:
  """The shard paths of `pattern` (braces expanded, then `*?[` globbed), or of a list; a UserError when none."""
  paths = []
  for path in expand_braces(os.path.expanduser(pattern)) if isinstance(pattern, str) else pattern:
    if any(c in path for c in "*?["):
      paths += sorted(os.fspath(p) for p in epath.Path(os.path.dirname(path) or ".").glob(os.path.basename(path)))
    else:
      paths.append(path)
  if not paths:
    raise UserError(f"wds:{pattern} matches no shards: name .tar files, e.g. DIR/{{000000..000099}}.tar or DIR/*.tar")
  return paths


def _stat(path: str) -> tuple[int, int]:
  """(size, mtime) of a shard; a one-line UserError when it cannot be reached."""
  try:
    st = os.stat(path) if "://" not in path else epath.Path(path).stat()
    return (st.st_size, st.st_mtime_ns) if "://" not in path else (int(st.length), int(st.mtime))
  except Exception as e:  # noqa: BLE001 - a local OSError, or whatever a remote file system raises
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"wds shard {path} cannot be opened ({reason}): check the shard pattern and the path") from None


def _scan(path: str, size: int) -> tuple[list[str], list[dict[str, tuple[int, int]]]]:
  """Keys and `{extension: (data offset, size)}` of the shard's samples, from its tar headers only."""
  keys, members = [], []
  try:
    with _open(path) as f:
      if f.read(2) == b"\x1f\x8b":
        raise UserError(f"wds shard {path} is gzip-compressed: random access needs plain .tar shards; gunzip them")
      f.seek(0)
      with tarfile.open(fileobj=f, mode="r:" if "://" not in path else "r|") as tar:
        for info in tar:
          found = _KEY.match(info.name)
          if not info.isreg() or _META.match(info.name) or not found:
            continue
          if info.offset_data + info.size > size:
            break  # a truncated last member
          if not keys or keys[-1] != found.group(1):
            keys.append(found.group(1))
            members.append({})
          members[-1].setdefault(found.group(2).lower(), (info.offset_data, info.size))
  except tarfile.TarError as e:
    if not keys:  # damage after some members (a truncated shard) keeps those members
      raise UserError(f"wds shard {path} is not a tar file ({e}): write shards with tar or webdataset") from None
  except OSError as e:
    raise UserError(f"wds shard {path} cannot be read ({e.strerror or e}): check its permissions") from None
  return keys, members


def index_shard(path: str, cache_dir: str | None) -> dict[str, np.ndarray]:
  """The shard's index: `keys` [n], `exts` [m], `offsets` and `sizes` int64 [n, m] (-1: no such member).
  Read from `cache_dir` when cached for this path, size and mtime; else scanned, then cached. `meta` (a JSON
  string of the path, size and mtime) identifies the shard's content."""
  size, mtime = _stat(path)
  meta = json.dumps({"version": INDEX_VERSION, "path": path, "size": size, "mtime": mtime})
  stem = os.path.basename(path).partition(".")[0] or "shard"
  cached = cache_dir and os.path.join(cache_dir, f"{hashlib.sha256(path.encode()).hexdigest()[:16]}-{stem}.npz")
  if cached:
    try:
      with _open(cached) as f:
        index = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
      if str(index["meta"]) == meta:
        return index
    except Exception:  # noqa: BLE001, S110 - missing, partial or foreign: the shard is indexed again
      pass
  keys, members = _scan(path, size)
  exts = sorted({e for m in members for e in m})
  table = np.asarray([[m.get(e, (-1, -1)) for e in exts] for m in members], np.int64).reshape(len(keys), len(exts), 2)
  index = {"keys": np.asarray(keys, str), "exts": np.asarray(exts, str), "offsets": table[..., 0]}
  index["sizes"] = table[..., 1]
  if cached:
    try:
      epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
      files.atomic_write(cached, lambda f: np.savez(f, meta=np.asarray(meta), **index), binary=True)
    except OSError as e:  # a read-only cache dir still works: shards are scanned on every open
      print(f"note: could not cache the index of {path} in {cache_dir}: {e.strerror}", flush=True)
  return {**index, "meta": np.asarray(meta)}


def _column(index: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
  """[n, 3]: (offset, size, position in `names`) of each sample's first member among `names`; -1 where none."""
  exts = list(index["exts"])
  out = np.full((len(index["keys"]), 3), -1, np.int64)
  for which in reversed(range(len(names))):  # the first name wins: it is written last
    if names[which] in exts:
      col = exts.index(names[which])
      have = index["offsets"][:, col] >= 0
      out[have] = np.stack([index["offsets"][have, col], index["sizes"][have, col], np.full(have.sum(), which)], 1)
  return out
