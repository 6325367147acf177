"""The one spelling of a pytree leaf's name: its jax key path, joined by a separator.

"opt_state.0.mu.dense.kernel" (the "." that orbax uses for a checkpoint's arrays) or "dense/kernel" (the
"/" of optimizer masks, freeze patterns and the keys of `files.save_tree`). Imports nothing of ours.
"""

from __future__ import annotations

import jax


def path_name(path: tuple, sep: str = ".") -> str:
  """`path` (from `jax.tree_util.tree_leaves_with_path` and friends) as a name: the dict keys,
  attribute names (dataclass and namedtuple fields) and sequence indices, joined by `sep`."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator=sep)
