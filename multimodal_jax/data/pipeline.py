"""grain pipelines: shuffled, per-process-sharded, checkpointable training batches; eval batches.

Every process reads its own shard of the records and yields its rows of each global batch
(`global_batch / process_count` of them); `sharding.host_to_global_batch` stitches them together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


class _FunctionMap(grain.transforms.Map):
  """A grain Map of a plain function (record -> record)."""

  def __init__(self, fn: Callable[[dict], dict]):
    self._fn = fn

  def map(self, element: dict) -> dict:
    return self._fn(element)


class _RowGroups:
  """Records of fixed groups of `size` rows of `source` (one seeded permutation), each fetched at once
  with `source.batch(rows)`: a record is one process's rows of one batch."""

  def __init__(self, source: Any, size: int, seed: int):
    self._source = source
    order = np.random.default_rng(seed).permutation(len(source))
    self._groups = order[: len(order) // size * size].reshape(-1, size)

  def __len__(self) -> int:
    return len(self._groups)

  def __getitem__(self, index: int) -> dict:
    return self._source.batch(self._groups[index])

  def __repr__(self) -> str:
    return f"_RowGroups({self._source!r}, size={self._groups.shape[1]})"


class GrainBatches:
  """An endless, epoch-reshuffled stream of this process's rows of each global batch.

  `iterator` is grain's checkpointable iterator (saved with the train state); `seek(step)`
  positions the stream at the batch of `step` without a saved state (used when a checkpoint was
  written by a different number of processes).

  `fetch_batches=True` is for sources of many small records that can gather rows vectorised,
  `source.batch(rows: int array) -> dict of stacked arrays` (AVDCNN's frames): batches are then
  fixed groups of rows (one seeded permutation, cut into batches) fetched in one call, and each
  epoch reshuffles the order of the groups, not their members. Much faster than stacking records
  one by one when records are a few KB.
  """

  def __init__(
    self,
    source: Any,
    global_batch: int,
    seed: int,
    *,
    transform: Callable[[dict], dict] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    fetch_batches: bool = False,
  ):
    index, count = _process_layout(process_index, process_count)
    if global_batch % count:
      raise ValueError(f"batch_size={global_batch} is not divisible by the {count} processes")
    self.local_batch = global_batch // count
    if len(source) // count < self.local_batch:
      raise ValueError(f"{len(source)} records split over {count} processes cannot fill a batch of {self.local_batch}")
    self._shard = (index, count)
    self._records_per_step = 1 if fetch_batches else self.local_batch
    if fetch_batches:
      source = _RowGroups(source, self.local_batch, seed)
    sampler = grain.samplers.IndexSampler(
      len(source),
      shard_options=grain.sharding.ShardOptions(index, count, drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=seed,
    )
    operations = [_FunctionMap(transform)] if transform is not None else []
    if not fetch_batches:
      operations.append(grain.transforms.Batch(self.local_batch, drop_remainder=True))
    self._loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=0)
    self.iterator = iter(self._loader)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def seek(self, step: int) -> None:
    """Positions the stream so that the next batch is the one of training step `step`."""
    index, count = self._shard
    state = json.loads(self.iterator.get_state())
    next_record = step * self._records_per_step  # records of this shard consumed before `step`
    state["last_seen_indices"] = {"0": next_record * count + index - count}
    state["last_worker_index"] = -1
    self.iterator.set_state(json.dumps(state).encode())


class ArraySource:
  """A random-access source over equally long arrays: record i is `{name: array[i]}`."""

  def __init__(self, **arrays: np.ndarray):
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"ArraySource takes arrays of one length, got lengths {sorted(lengths)}")
    self._arrays = arrays
    self._len = lengths.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    return {k: v[i] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    return f"ArraySource({', '.join(f'{k}={v.shape}' for k, v in self._arrays.items())})"


class TextDecoded:
  """`source` with the text fields `keys` given as `str`: TFDS stores text as UTF-8 bytes (a `bytes`
  or a 0-d bytes array), and records of this source carry the decoded string instead."""

  def __init__(self, source: Any, keys: tuple[str, ...]):
    self._source = source
    self._keys = keys

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    record = dict(self._source[i])
    for key in self._keys:
      value = record[key]
      value = value.item() if isinstance(value, np.ndarray) else value
      record[key] = value.decode() if isinstance(value, bytes) else str(value)
    return record

  def __repr__(self) -> str:
    return f"TextDecoded({self._source!r}, keys={self._keys})"


def load_on_every_process(load: Callable[[], Any]) -> Any:
  """Runs `load()` (which may prepare a dataset on first use) on process 0 first, then on the
  others once it is done, so that several processes never prepare the same files at once."""
  if jax.process_count() == 1:
    return load()
  from jax.experimental import multihost_utils

  result = load() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("dataset prepared")
  return result if result is not None else load()


def eval_batches(
  source: Any,
  global_batch: int,
  *,
  transform: Callable[[dict], dict] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict]:
  """One ordered pass over `source`, this process's rows of each global batch.

  The last batch is padded by repeating records; `mask` (float32 `[local_batch]`) is 1 for real
  records, so metrics are exact whatever the dataset size.
  """
  index, count = _process_layout(process_index, process_count)
  local = global_batch // count
  n = len(source)
  for start in range(0, n, global_batch):
    rows = [start + index * local + i for i in range(local)]
    records = [source[min(r, n - 1)] for r in rows]
    if transform is not None:
      records = [transform(r) for r in records]
    batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
    batch["mask"] = np.asarray([r < n for r in rows], np.float32)
    yield batch
