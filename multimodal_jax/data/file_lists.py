"""The images of a CSV of image-caption pairs or of a folder of class sub-folders, as `ImageItem`s.

- CSV (open_clip's convention): a header row, then one row per pair; the image-path and caption
  columns are named by `image_key` (default `filepath`) and `caption_key` (default `title`), the
  separator is a tab by default. A relative image path is relative to the CSV's folder.
- Folder (torchvision's `ImageFolder` convention): `DIR/CLASS_NAME/**/IMAGE`; the class names are the
  sub-folders' names (spaces allowed) and the class indices follow their sorted order. Files are
  listed as `ImageFolder` lists them (sorted walk, links followed, image endings only). Hidden
  entries (names starting with ".", such as `.ipynb_checkpoints`) are not classes and not images.

Each listing also returns a fingerprint of the source's content for the image cache's key.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re

from multimodal_jax.data import image_files
from multimodal_jax.data.image_cache import ImageItem, file_fingerprint
from multimodal_jax.errors import UserError


def cache_name(kind: str, path: str) -> str:
  """A readable, file-system-safe prefix for a source's cache folder, e.g. `csv-pairs`."""
  stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  return f"{kind}-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40] or "data")


def csv_items(path: str, image_key: str, caption_key: str, separator: str) -> tuple[list[ImageItem], str]:
  """The (image, caption) rows of the CSV at `path` and its fingerprint (its bytes, the settings and
  the listed files' sizes and modification times).

  Raises:
    UserError: the file is missing or unreadable, a column is missing, or it holds no rows.
  """
  spec = f"csv:{path}"
  if os.path.isdir(path):
    raise UserError(f"{spec} is a folder: csv: takes a CSV file (for class sub-folders use folder:{path})")
  try:
    with open(path, "rb") as f:
      content = f.read()
  except FileNotFoundError:
    raise UserError(f"{spec}: no such file; check the path (relative paths start from the current folder)") from None
  except OSError as e:
    raise UserError(f"{spec} cannot be read: {e.strerror}") from None
  try:
    text = content.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{spec} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
  reader = csv.DictReader(text.splitlines(), delimiter=separator)
  columns = reader.fieldnames or []
  for key, setting in ((image_key, "csv_image_key"), (caption_key, "csv_caption_key")):
    if key not in columns:
      shown = ", ".join(repr(c) for c in columns[:8]) or "none"
      hint = "" if len(columns) > 1 else f", or --config.csv_separator (now {separator!r}) if it is not the file's"
      raise UserError(
        f"{spec} has no column {key!r} (its header's columns: {shown}): set --config.{setting} to the column's name"
        + hint
      )
  folder = os.path.dirname(os.path.abspath(path))
  items = []
  for row in reader:
    name = (row.get(image_key) or "").strip()
    if not name and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
      continue  # a blank line
    image = os.path.join(folder, os.path.expanduser(name)) if name else ""
    items.append(ImageItem(path=image, text=row.get(caption_key) or ""))
  if not items:
    raise UserError(f"{spec} has a header but no rows: add one row per image-caption pair")
  digest = hashlib.sha256(content)
  digest.update(f"\0{separator}\0{image_key}\0{caption_key}\0".encode())
  digest.update(file_fingerprint([item.path for item in items]).encode())
  return items, digest.hexdigest()


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def folder_items(path: str) -> tuple[list[ImageItem], tuple[str, ...], str]:
  """The images of the class folder `path`, its class names (sorted) and its fingerprint.

  Raises:
    UserError: the folder is missing, holds no class sub-folders, or a class holds no images.
  """
  spec = f"folder:{path}"
  if not os.path.isdir(path):
    what = "is a file" if os.path.exists(path) else "does not exist"
    raise UserError(f"{spec} {what}: folder: takes a folder with one sub-folder of images per class")
  try:
    entries = sorted(e.name for e in os.scandir(path) if e.is_dir() and not _is_hidden(e.name))
  except OSError as e:
    raise UserError(f"{spec} cannot be read: {e.strerror}") from None
  if not entries:
    loose = any(image_files.is_image_file(n) for n in os.listdir(path))
    hint = " (its images lie loose in it)" if loose else ""
    raise UserError(f"{spec} holds no class sub-folders{hint}: put each class's images in {path}/CLASS_NAME/")
  items = []
  for label, name in enumerate(entries):
    walked = []
    for root, dirs, names in os.walk(os.path.join(path, name), followlinks=True):
      dirs[:] = [d for d in dirs if not _is_hidden(d)]
      walked.append((root, names))
    found = [
      os.path.join(root, n) for root, names in sorted(walked) for n in sorted(names) if image_files.is_image_file(n)
    ]
    if not found:
      endings = ", ".join(image_files.IMAGE_EXTENSIONS)
      raise UserError(f"{spec}: the class folder {name!r} holds no images ({endings}): add images or remove it")
    items += [ImageItem(path=p, label=label) for p in found]
  fingerprint = hashlib.sha256("\0".join(entries).encode())
  fingerprint.update(file_fingerprint([item.path for item in items]).encode())
  return items, tuple(entries), fingerprint.hexdigest()
