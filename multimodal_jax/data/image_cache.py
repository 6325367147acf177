"""Decoded, resized images cached once as array_record, read back with random access.

Training reads every image many times; decoding and resizing a file each time costs far more than
reading its final pixels. `prepare` decodes a list of image files once (`image_files.load_image`)
and writes their uint8 `[size, size, channels]` pixels as one array_record file (one record per
image, `group_size:1` so that reading record i decompresses only record i), with an `index.json`
of each record's source path, label and caption. `CachedImages` reads that folder as a random-access
source for grain.

The cache folder's name holds a hash of the source's content (as given by the caller: the CSV's
bytes, the file list with sizes and modification times) and of the preprocessing settings, so a
changed source or another image size gets its own cache and an unchanged one is never prepared
twice. The folder is written under a temporary name and renamed into place when complete, so an
interrupted preparation leaves nothing that looks finished.

Files that cannot be read are skipped: their count is printed at the end, and each is named with
its reason in `unreadable.txt` beside the cache. More than `MAX_UNREADABLE` of them is a UserError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np
import tqdm

from multimodal_jax import files
from multimodal_jax.data import image_files
from multimodal_jax.errors import UserError

FORMAT_VERSION = 1  # bump when the preprocessing or the layout changes: old caches are then not reused
MAX_UNREADABLE = 0.01  # share of unreadable files above which preparation fails
INDEX = "index.json"
RECORDS = "images.array_record"
UNREADABLE = "unreadable.txt"


@dataclasses.dataclass(frozen=True)
class ImageItem:
  """One image of a source: its file, class index (-1: none) and caption (None: none)."""

  path: str
  label: int = -1
  text: str | None = None


def file_fingerprint(paths: Sequence[str]) -> str:
  """A hash of each path with its size and modification time ("missing" for absent files)."""
  digest = hashlib.sha256()
  for path in paths:
    try:
      stat = os.stat(path)
      digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
      digest.update(f"{path}\0missing\n".encode())
  return digest.hexdigest()


def cache_folder(cache_dir: str, name: str, fingerprint: str, size: int, channels: int) -> str:
  """The cache folder of a source (`fingerprint` of its content) under the given settings."""
  key = hashlib.sha256(f"{FORMAT_VERSION}\0{fingerprint}\0{size}\0{channels}".encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"{name}-{size}px-{channels}ch-{key}")


def prepare(
  items: Sequence[ImageItem],
  *,
  size: int,
  channels: int,
  cache_dir: str,
  name: str,
  fingerprint: str,
  source: str,
  class_names: Sequence[str] | None = None,
) -> CachedImages:
  """The cached images of `items` (prepared now unless an identical cache exists).

  Args:
    items: the source's images, in record order.
    size, channels: the pixels of each record, uint8 `[size, size, channels]`.
    cache_dir: where cache folders live (in the data dir).
    name: a readable prefix of the cache folder's name (e.g. "csv-pairs").
    fingerprint: a hash of the source's content (see `file_fingerprint`).
    source: the source as the user named it (for messages), e.g. "csv:/data/pairs.tsv".
    class_names: the names of the labels, stored with the cache.

  Raises:
    UserError: no items, more than MAX_UNREADABLE of them unreadable, or the cache dir not writable.
  """
  folder = cache_folder(cache_dir, name, fingerprint, size, channels)
  if os.path.isfile(os.path.join(folder, INDEX)):
    return CachedImages(folder)
  if not items:
    raise UserError(f"{source} names no images: add images to it")
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:
    raise UserError(
      f"cannot create the image cache {cache_dir}: {e.strerror}; set --config.data_dir to a writable folder"
    ) from None
  partial = f"{folder}.incomplete-{os.getpid()}"
  try:
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    kept, skipped = _write_records(items, size, channels, os.path.join(partial, RECORDS), source)
  except OSError as e:
    shutil.rmtree(partial, ignore_errors=True)
    raise UserError(
      f"cannot write the image cache in {cache_dir}: {e.strerror}; free space or set --config.data_dir elsewhere"
    ) from None
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  log = os.path.join(cache_dir, f"{os.path.basename(folder)}-{UNREADABLE}")
  if skipped:
    files.atomic_write_text(log, "".join(f"{path}\t{reason}\n" for path, reason in skipped))
  if len(skipped) > MAX_UNREADABLE * len(items):
    shutil.rmtree(partial, ignore_errors=True)
    path, reason = skipped[0]
    raise UserError(
      f"{len(skipped)} of the {len(items)} images of {source} cannot be read (more than {MAX_UNREADABLE:.0%}), e.g. "
      f"{path} ({reason}); all are listed in {log}: fix or remove them"
    )
  index = {
    "version": FORMAT_VERSION,
    "source": source,
    "size": size,
    "channels": channels,
    "paths": [items[i].path for i in kept],
    "labels": [items[i].label for i in kept] if any(item.label >= 0 for item in items) else None,
    "texts": [items[i].text for i in kept] if any(item.text is not None for item in items) else None,
    "class_names": list(class_names) if class_names is not None else None,
    "unreadable": len(skipped),
  }
  files.write_json(os.path.join(partial, INDEX), index, indent=None)
  try:
    os.rename(partial, folder)
  except OSError:  # another process finished the same cache first: keep theirs
    shutil.rmtree(partial, ignore_errors=True)
  note = f"; {len(skipped)} unreadable file(s) skipped, listed in {log}" if skipped else ""
  print(f"prepared {len(kept)} images of {source} in {folder}{note}", flush=True)
  return CachedImages(folder)


def _write_records(
  items: Sequence[ImageItem], size: int, channels: int, path: str, source: str
) -> tuple[list[int], list[tuple[str, str]]]:
  """Decodes every item into one record of `path`; returns the kept indices and (path, reason) of the others."""
  from array_record.python import array_record_module

  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  kept, skipped = [], []
  try:
    for i, item in enumerate(tqdm.tqdm(items, desc=f"preparing {source}", unit=" images", disable=None)):
      try:
        pixels = image_files.load_image(item.path, size, channels)
      except image_files.UnreadableImage as e:
        skipped.append((item.path, str(e)))
        continue
      writer.write(pixels.tobytes())
      kept.append(i)
  finally:
    writer.close()
  return kept, skipped


class CachedImages:
  """A prepared cache as a random-access source: record i is {"image": uint8 `[size, size, channels]`,
  "label": int64 `[]` (sources with classes), "text": str (sources with captions)}.

  `paths[i]` is record i's file; `class_names` the names of the labels (or None).
  """

  def __init__(self, folder: str):
    from array_record.python import array_record_data_source

    self.folder = folder
    with open(os.path.join(folder, INDEX)) as f:
      index = json.load(f)
    self.size, self.channels = int(index["size"]), int(index["channels"])
    self.paths: list[str] = index["paths"]
    self.labels = None if index["labels"] is None else np.asarray(index["labels"], np.int64)
    self.texts: list[str] | None = index["texts"]
    self.class_names = None if index["class_names"] is None else tuple(index["class_names"])
    self.unreadable = int(index["unreadable"])
    self._records = array_record_data_source.ArrayRecordDataSource([os.path.join(folder, RECORDS)])
    if len(self._records) != len(self.paths):
      raise UserError(
        f"the image cache {folder} holds {len(self._records)} images where its index says {len(self.paths)}: "
        "delete the folder to prepare it again"
      )

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    return self._record(int(i), self._records[int(i)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    indices = [int(i) for i in indices]
    return [self._record(i, data) for i, data in zip(indices, self._records.__getitems__(indices), strict=True)]

  def _record(self, i: int, data: bytes) -> dict:
    record = {"image": np.frombuffer(data, np.uint8).reshape(self.size, self.size, self.channels)}
    if self.labels is not None:
      record["label"] = self.labels[i]
    if self.texts is not None:
      record["text"] = self.texts[i]
    return record

  def chunks(self, chunk: int = 1024):
    """Every image in record order, as stacked uint8 `[n, size, size, channels]` chunks of up to `chunk`."""
    for start in range(0, len(self), chunk):
      data = self._records.__getitems__(list(range(start, min(start + chunk, len(self)))))
      yield np.frombuffer(b"".join(data), np.uint8).reshape(-1, self.size, self.size, self.channels)

  def statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the cached images in [0, 1] units (computed once, kept in the folder)."""
    path = os.path.join(self.folder, "statistics.json")
    if os.path.isfile(path):
      with open(path) as f:
        stats = json.load(f)
      return tuple(stats["mean"]), tuple(stats["std"])
    mean, std = image_files.image_statistics(self.chunks(), self.channels)
    try:
      files.write_json(path, {"mean": mean, "std": std})
    except OSError as e:  # a read-only cache still works, it just recomputes
      print(f"note: could not store the image statistics in {self.folder}: {e.strerror}", file=sys.stderr)
    return mean, std

  def __repr__(self) -> str:
    return f"CachedImages({self.folder!r}, {len(self)} images of {self.size}x{self.size}x{self.channels})"

  def __getstate__(self):
    return {"folder": self.folder}

  def __setstate__(self, state):
    self.__init__(state["folder"])
