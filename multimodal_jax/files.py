"""Files that are rewritten in place, written so that a kill at any moment leaves the old or the new
version whole: write a temporary file beside the target, flush it to disk, rename it over the target.

Used for every file the library rewrites (metrics.jsonl on resume, eval.json, caches of arrays).
Nothing here imports the rest of the package but the leaf `trees`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import jax
import numpy as np
from etils import epath

from multimodal_jax import trees


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
  """Calls `write(f)` on a temporary file in `path`'s directory, then renames it to `path`.

  A remote path (`gs://...`: object stores publish an object whole when it is closed) is written
  directly through `etils.epath`."""
  if "://" in os.fspath(path):
    with epath.Path(path).open("wb" if binary else "w") as f:
      write(f)
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
  """`value` as JSON at `path`, atomically."""
  atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def save_tree(path: str, tree: dict, meta: dict | None = None) -> None:
  """A nested dict of arrays (and `meta`: small JSON-able values) as one .npz, atomically.
  Keys are '/'-joined paths (`trees.path_name`), so a key must not contain '/'."""
  flat = {trees.path_name(k, "/"): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  flat["__meta__"] = np.asarray(json.dumps(meta or {}))
  atomic_write(path, lambda f: np.savez(f, **flat), binary=True)


def load_tree(path: str) -> tuple[dict, dict]:
  """`(tree, meta)` as written by `save_tree`; the arrays are numpy."""
  tree: dict = {}
  with np.load(path) as data:
    meta = json.loads(str(data["__meta__"])) if "__meta__" in data.files else {}
    for key in data.files:
      if key == "__meta__":
        continue
      node = tree
      *parents, leaf = key.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = data[key]
  return tree, meta
