"""webdataset tar shards read in place as a random-access grain source: CLIP training and eval data, no copy.

Layout (open_clip, img2dataset, DataComp): consecutive members `KEY.jpg|jpeg|png|webp`, `KEY.txt` or `KEY.json`
(caption: first of `json_caption_field`), optionally `KEY.cls` (class index; clip_benchmark's eval shards). A key
is the member path up to the first dot of its base name; consecutive members of one key are one sample (webdataset's).

Each shard is indexed once from its tar headers alone (local: seeks past member data; remote: one stream) and the
index (keys, member offsets and sizes) is cached as an `.npz` in `cache_dir`, valid for the shard's path, size
and mtime. A sample is then one or two reads at known offsets (`os.pread` locally, `etils.epath` for `gs://`) and
the Pillow decode of `image_files`, the pixels of the `csv:`/`folder:` image cache. Shards must be plain tars.

Processes split records, not shards (`GrainBatches` gives each every `process_count`-th record of one global
shuffle): random access reads only a process's own records and keeps the shuffle global and exact; open files
are cached as each process reads from most shards (`max_open`, least recently used closed first).

A sample that cannot be used (undecodable image, JSON without a caption field, bad `.cls`) never raises. With
`resample=True` (training) record `i` is the first usable of `(i + k * stride) % n`, k = 0, 1, ... (a prime
`stride` not dividing n): a pure function of `i` and the data, so batch b stays a pure function of b, resume
stays exact and the loss needs no mask. With `resample=False` (eval: a duplicate would skew a metric) or after
`max_tries` failures it is a zero image with `valid=False`, for the caller to mask. `skipped_samples` counts the
failed reads of this process; grain workers read in their own processes, so each record also carries `skipped`
(failures before it), which a training transform passes on as the batch column `loop.SKIPPED_KEY` for the loop
to sum and log (`skipped_samples` in metrics.jsonl). Evaluation reads `usable()`: the source without its
unusable samples, found by one read of every sample (cached beside the indexes). Samples lacking a member in
`need` ("caption", "label") are left out at open (`incomplete_samples`; `requiring` narrows an open source).
The sample table takes ~72 bytes per sample in every process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from etils import epath

from multimodal_jax import files
from multimodal_jax.data import image_files
from multimodal_jax.data.tar_index import _column, _open, index_shard, list_shards
from multimodal_jax.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_STRIDES = (1_000_003, 999_983, 7_919)  # primes: one does not divide n, so k * stride visits every index
_COALESCE = 1 << 16  # members of one sample at most this far apart are fetched in one read


class _Handles:
  """This process's open shard files, at most `limit` (the least recently used idle one closed first; one in
  use by another thread is never closed). Reopened after a fork, whose descriptors share the parent's offsets."""

  def __init__(self, limit: int):
    self._limit, self._pid, self._lock, self._open = limit, os.getpid(), threading.Lock(), OrderedDict()

  def read(self, path: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes at each (offset, size) of `path`: one read when the spans lie close together."""
    start, end = min(o for o, _ in spans), max(o + s for o, s in spans)
    whole = [(start, end - start)] if end - start <= sum(s for _, s in spans) + _COALESCE else spans
    entry = self._acquire(path)
    try:
      if "://" not in path:
        chunks = [os.pread(entry[0], size, offset) for offset, size in whole]
      else:
        with entry[2]:
          chunks = [(entry[0].seek(offset), entry[0].read(size))[1] for offset, size in whole]
    finally:
      with self._lock:
        entry[1] -= 1
    return chunks if whole is spans else [chunks[0][o - start : o - start + s] for o, s in spans]

  def _acquire(self, path: str) -> list:
    with self._lock:
      if self._pid != os.getpid():
        self._pid, self._open = os.getpid(), OrderedDict()
      if path not in self._open:
        handle = os.open(path, os.O_RDONLY) if "://" not in path else epath.Path(path).open("rb")
        self._open[path] = [handle, 0, threading.Lock()]  # handle, users, lock (seek + read of remote files)
        idle = [p for p, e in self._open.items() if e[1] == 0 and p != path]
        for stale in idle[: max(0, len(self._open) - self._limit)]:
          handle = self._open.pop(stale)[0]
          os.close(handle) if isinstance(handle, int) else handle.close()
      self._open.move_to_end(path)
      self._open[path][1] += 1
      return self._open[path]


class WdsSource:
  """Shards (a pattern or a list of paths) as a random-access source for `GrainBatches` and `eval_batches`:
  record i is `{"image": uint8 [image_size, image_size, channels], caption_field: str, "label": int (-1: none),
  "valid": bool, "key": str (the sample's key in its shard), "skipped": int}`. `class_names` are those of a
  `classnames.txt` beside the shards or one folder up, else None; `has_captions`/`has_labels` whether any has one.
  """

  def __init__(
    self,
    shards: str | Sequence[str],
    cache_dir: str | None,
    image_size: int,
    channels: int,
    caption_keys: Sequence[str] = ("txt", "json"),
    json_caption_field: Sequence[str] = ("caption", "text", "title"),
    label_key: str = "cls",
    *,
    need: Sequence[str] = ("caption",),
    caption_field: str = "caption",
    resample: bool = True,
    max_tries: int = 16,
    max_open: int = 64,
  ):
    self.shards = list_shards(shards)
    self.image_size, self.channels, self.caption_field = image_size, channels, caption_field
    self._caption_keys, self._json_fields = tuple(caption_keys), tuple(json_caption_field)
    self._resample, self._max_tries, self._max_open = resample, max_tries, max_open
    self._cache_dir, self._keys, columns, metas = cache_dir, [], [], []
    for number, path in enumerate(self.shards):
      index = index_shard(path, cache_dir)
      metas.append(str(index["meta"]))
      image, caption, label = (_column(index, names) for names in (IMAGE_EXTS, self._caption_keys, (label_key,)))
      self._keys.append(index["keys"])
      rows = np.flatnonzero(image[:, 0] >= 0)
      number_column = np.full((len(rows), 1), number, np.int64)
      columns.append(np.hstack([number_column, rows[:, None], image[rows, :2], caption[rows], label[rows, :2]]))
    # Per sample: shard, row, image (offset, size), caption (offset, size, which key), label (offset, size).
    table = np.concatenate(columns)
    if not len(table):
      raise UserError(f"wds shards {self.shards[0]}... hold no images ({', '.join(IMAGE_EXTS)} members): check names")
    # What the samples' bytes depend on: the shards' contents and how captions are found (`usable`'s cache key).
    self._fingerprint = json.dumps([metas, self._caption_keys, self._json_fields, label_key])
    self.class_names = _class_names(self.shards[0])
    self.incomplete_samples, self._table = 0, table
    self.unusable_samples, self.unusable_reasons = 0, Counter()  # set by `usable`
    self.__setstate__({})  # this process's open files and counts
    self._restrict(need)

  def _restrict(self, need: Sequence[str]) -> None:
    """Leaves out the samples lacking a member of `need` (counted in `incomplete_samples`)."""
    keep = np.ones(len(self._table), bool)
    for field, column in (("caption", 4), ("label", 7)):
      if field in need:
        keep &= self._table[:, column] >= 0
    if not keep.any():
      raise UserError(f"wds shards {self.shards[0]}... hold no samples with an image and {list(need)}: check names")
    self.incomplete_samples += int((~keep).sum())
    self._set_table(self._table[keep])

  def _set_table(self, table: np.ndarray) -> None:
    self._table = table
    self._stride = next(p for p in _STRIDES if len(table) % p)
    self.has_captions, self.has_labels = bool((table[:, 4] >= 0).any()), bool((table[:, 7] >= 0).any())

  def _copy(self) -> WdsSource:
    """A copy sharing the sample table, with its own open files and counts."""
    out = object.__new__(WdsSource)
    out.__setstate__(self.__getstate__())
    return out

  def requiring(self, need: Sequence[str]) -> WdsSource:
    """This source without the samples lacking a member of `need` ("caption", "label"); a UserError when none
    is left. Cheaper than opening the shards again (the indexes are not read twice)."""
    out = self._copy()
    out._restrict(need)
    return out

  def usable(self, threads: int = 8) -> WdsSource:
    """This source without the samples that cannot be used (evaluation: a replacement would count a sample
    twice, a placeholder would count as a miss). Every sample is read once, in `threads` threads (Pillow
    decodes outside the GIL); which were usable is cached in `cache_dir`, keyed by the shards' contents, so a
    later evaluation of the same shards reads each sample once. `unusable_samples` is their number and
    `unusable_reasons` a Counter of why; a UserError when no sample is usable."""
    digest = hashlib.sha256(self._fingerprint.encode() + self._table.tobytes()).hexdigest()[:16]
    cached = self._cache_dir and os.path.join(self._cache_dir, f"usable-{digest}.npz")
    ok, reasons = None, Counter()
    if cached:
      try:
        with _open(cached) as f:
          saved = np.load(io.BytesIO(f.read()), allow_pickle=False)
          ok, reasons = saved["ok"], Counter(json.loads(str(saved["reasons"])))
        if ok.shape != (len(self),):
          ok = None
      except Exception:  # noqa: BLE001 - missing or foreign: the samples are read again
        ok = None
    if ok is None:
      with ThreadPoolExecutor(max(1, threads)) as pool:  # "" for a usable sample, else why not (no pixels kept)
        verdicts = list(pool.map(lambda j: "" if isinstance(r := self._read(j), dict) else r, range(len(self))))
      ok, reasons = np.asarray([not v for v in verdicts], bool), Counter(v for v in verdicts if v)
      if cached:
        try:
          epath.Path(self._cache_dir).mkdir(parents=True, exist_ok=True)
          payload = {"ok": ok, "reasons": np.asarray(json.dumps(reasons))}
          files.atomic_write(cached, lambda f: np.savez(f, **payload), binary=True)
        except OSError as e:  # read-only: the next evaluation reads every sample again
          print(f"note: could not cache the usable samples in {self._cache_dir}: {e.strerror}", flush=True)
    if not ok.any():
      raise UserError(f"no sample of the wds shards {self.shards[0]}... can be used ({dict(reasons)}): check them")
    out = self._copy()
    out._set_table(self._table[ok])
    out.unusable_samples, out.unusable_reasons = int((~ok).sum()), reasons
    return out

  @property
  def paths(self) -> list[str]:
    """`SHARD#KEY` of each record: where a prediction's sample is."""
    return [f"{self.shards[shard]}#{self._keys[shard][row]}" for shard, row in self._table[:, :2].tolist()]

  @property
  def skipped_samples(self) -> int:
    """Failed sample reads in this process so far (each replaced, or returned with valid=False)."""
    return sum(self.skip_reasons.values())

  def __len__(self) -> int:
    return len(self._table)

  def __getitem__(self, i: int) -> dict:
    tries = self._max_tries + 1 if self._resample else 1
    for k in range(tries):
      record = self._read((int(i) + k * self._stride) % len(self._table))
      if isinstance(record, dict):
        return {**record, "skipped": k}
      with self._lock:
        self.skip_reasons[record] += 1
    image = np.zeros((self.image_size, self.image_size, self.channels), np.uint8)
    return {"image": image, self.caption_field: "", "label": -1, "valid": False, "key": "", "skipped": tries}

  def _read(self, j: int) -> dict | str:
    """Sample j's record, or the reason it cannot be used."""
    shard, row, image_at, image_size, cap_at, cap_size, cap_which, label_at, label_size = map(int, self._table[j])
    spans = [(image_at, image_size)] + [(o, s) for o, s in ((cap_at, cap_size), (label_at, label_size)) if o >= 0]
    try:
      data = self._handles.read(self.shards[shard], spans)
    except OSError:
      return "unreadable shard"
    if any(len(d) != s for d, (_, s) in zip(data, spans, strict=True)):
      return "truncated member"
    try:
      pixels = image_files.load_image(data[0], self.image_size, self.channels)
    except image_files.UnreadableImage:
      return "undecodable image"
    caption, label = "", -1
    try:
      if cap_at >= 0:
        caption = data[1].decode("utf-8")
        if self._caption_keys[cap_which] == "json":
          value = json.loads(caption)
          found = [value[f] for f in self._json_fields if isinstance(value, dict) and isinstance(value.get(f), str)]
          if not found:
            return "no caption field in json"
          caption = found[0]
      if label_at >= 0:
        label = int(data[-1].decode("utf-8").strip())
    except ValueError:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
      return "bad caption or label"
    key = str(self._keys[shard][row])
    return {"image": pixels, self.caption_field: caption.strip(), "label": label, "valid": True, "key": key}

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_lock", "skip_reasons")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._handles, self._lock, self.skip_reasons = _Handles(self._max_open), threading.Lock(), Counter()

  def __repr__(self) -> str:
    shards = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]}..{self.shards[-1]}"
    return f"WdsSource({len(self.shards)} shards {shards}, {len(self)} samples, {self.image_size}px {self.channels}ch)"


def _class_names(shard: str) -> tuple[str, ...] | None:
  """clip_benchmark's `classnames.txt` (one name a line) beside the shards or one folder up, if any."""
  folder = os.path.dirname(os.path.abspath(shard) if "://" not in shard else shard)
  for candidate in (os.path.join(folder, "classnames.txt"), os.path.join(os.path.dirname(folder), "classnames.txt")):
    try:
      with _open(candidate) as f:
        return tuple(n.strip() for n in f.read().decode("utf-8").splitlines() if n.strip())
    except Exception:  # noqa: BLE001, S112 - absent or unreadable: a source without class names
      continue
  return None


def open_wds(pattern: str, cache_dir: str | None, image_size: int = 224, channels: int = 3, **options) -> WdsSource:
  """The `WdsSource` of a shard pattern (`wds:PATTERN`'s PATTERN), its indexes cached in `cache_dir`.
  `options` are `WdsSource`'s: e.g. `need=("label",), resample=False` for clip_benchmark eval shards."""
  return WdsSource(pattern, cache_dir, image_size, channels, **options)
