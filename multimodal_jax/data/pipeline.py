"""grain pipelines: shuffled, per-process-sharded, checkpointable training batches; eval batches.

Every process reads its own shard of the records and yields its rows of each global batch
(`global_batch / process_count` of them); `sharding.host_to_global_batch` stitches them together.
"""

from __future__ import annotations

import json
import os
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


def worker_count(setting: int, platform: str) -> int:
  """grain worker processes for `--config.data_workers=setting`; -1 (auto) is 0 when JAX computes
  on the CPU (the train step uses every core, and workers slowed it on 2 cores: docs/data.md),
  else half the host's cores up to 4, to decode and transform beside the accelerator's step."""
  if setting >= 0:
    return setting
  if platform == "cpu":
    return 0
  return max(1, min(4, (os.cpu_count() or 2) // 2))


class _Batches:
  """Record `i` is this process's rows of batch `start + i` of the stream: the sampler's records at
  the shard's positions `[b * per_step, (b + 1) * per_step)`, each transformed, then stacked (or, for
  row groups, the one group). A pure function of the batch index, so grain's worker processes can
  each build some of the batches and the stream is the same whatever their number."""

  def __init__(self, source, sampler, shard, per_step, transform, stack, start=0):
    self._source, self._sampler, self._shard = source, sampler, shard
    self._per_step, self._transform, self._stack, self.start = per_step, transform, stack, start

  def __len__(self) -> int:
    return _ENDLESS

  def __getitem__(self, i: int) -> dict:
    index, count = self._shard
    first = (self.start + i) * self._per_step
    keys = [self._sampler[index + (first + j) * count].record_key for j in range(self._per_step)]
    records = [self._source[k] for k in keys]
    if self._transform is not None:
      records = [self._transform(r) for r in records]
    return jax.tree.map(lambda *rows: np.stack(rows), *records) if self._stack else records[0]

  def __repr__(self) -> str:
    return f"_Batches({self._source!r}, start={self.start})"


_ENDLESS = 2**62  # the batch stream's nominal length (it never ends)


class GrainBatches:
  """An endless, epoch-reshuffled stream of this process's rows of each global batch.

  The records of each epoch come in the order of a seeded grain `IndexSampler`, sharded over the
  processes; batch `b` is this shard's next `local_batch` of them, built by `_Batches`. With
  `workers > 0`, grain worker processes build the batches ahead of the train step (decoding and
  transforms then run beside it); the stream is the same for every number of workers.

  `iterator` is what the checkpoint saves (`get_state`/`set_state`, in grain's data-loader format
  for zero workers, whatever `workers` is, so that a run may resume with another count; `get_state`
  says why grain's own iterator states do not serve);
  `seek(step)` positions the stream at the batch of `step` without a saved state (used when a
  checkpoint was written by a different number of processes).

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
    workers: int = 0,
  ):
    index, count = _process_layout(process_index, process_count)
    if global_batch % count:
      raise ValueError(f"batch_size={global_batch} is not divisible by the {count} processes")
    self.local_batch = global_batch // count
    if len(source) // count < self.local_batch:
      raise ValueError(f"{len(source)} records split over {count} processes cannot fill a batch of {self.local_batch}")
    self._shard = (index, count)
    self._per_step = 1 if fetch_batches else self.local_batch
    if fetch_batches:
      source = _RowGroups(source, self.local_batch, seed)
    self._sampler = grain.samplers.IndexSampler(
      len(source),
      shard_options=grain.sharding.ShardOptions(index, count, drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=seed,
    )
    self._source_repr = repr(source)
    self._batches = _Batches(source, self._sampler, self._shard, self._per_step, transform, not fetch_batches)
    self._workers = workers
    self._next = 0  # the batch that __next__ returns next
    self._loader = None  # grain's multi-process iterator, started at batch _next on first use
    self.iterator = self

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if not self._workers:
      batch = self._batches[self._next]
    else:
      if self._loader is None:
        self._loader = self._start_workers()
      # Out of grain's shared memory into the process's own: a batch kept past the loader (or to
      # the interpreter's exit) would otherwise hold a shared-memory block that is never unlinked.
      batch = jax.tree.map(np.array, next(self._loader))
    self._next += 1
    return batch

  def _start_workers(self):
    from absl import flags

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which no absl main parsed here
    self._batches.start = self._next
    options = grain.MultiprocessingOptions(num_workers=self._workers)
    return iter(grain.MapDataset.source(self._batches).to_iter_dataset().mp_prefetch(options))

  def close(self) -> None:
    """Stops the worker processes (they start again on the next batch)."""
    if self._loader is not None:
      self._loader.close()
      self._loader = None

  def seek(self, step: int) -> None:
    """Positions the stream so that the next batch is the one of training step `step`."""
    self.close()
    self._next = step

  def get_state(self) -> bytes:
    """The position of the stream as grain's `DataLoader` saves a zero-worker loader's (JSON bytes):
    `last_seen_indices["0"]` is the global sampler index of the last record this shard consumed.

    Written here, for every worker count, because no state that grain (0.2.18) offers meets all three
    needs, resume at the exact batch, one state for any number of workers, and restoring the states that
    existing checkpoints hold (this format, which must therefore stay):

    - `grain.DataLoader`'s state has one `last_seen_indices` entry per worker and `worker_count`, and its
      `set_state` raises ValueError for a state of another worker count: not valid for any worker count.
    - The iterator of `to_iter_dataset().mp_prefetch(...)` (what runs our workers) saves `{"next_index"}`
      with no workers but, with k workers, the interleave's state: k per-worker `{"next_index"}` in
      `iterators_in_use_states` and the cycle position; a state of one count raises on another (KeyError
      'exhausted' for a 0-worker state in a 1-worker iterator): not valid for any worker count.
    - `grain.experimental.ElasticIterator` saves a worker-independent `{"global_next_index"}`, but (an
      experimental API) in another format: the states existing checkpoints hold would still need this
      translation, checkpoints it writes could not be read by earlier releases of this library, and it
      batches the records itself, so `fetch_batches` row groups (already batches) would be stacked again.

    Our batches are a pure function of the batch index (`_Batches`), so the zero-worker state is exact
    whatever the worker count, and `set_state` below is the inverse grain applies to it."""
    index, count = self._shard
    next_record = self._next * self._per_step  # records of this shard consumed so far
    state = {
      "version": 2,
      "last_seen_indices": {"0": next_record * count + index - count},
      "last_worker_index": -1,
      "worker_count": 0,
      "sampler": repr(self._sampler),
      "data_source": self._source_repr,
    }
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    """Positions the stream at the batch after the one `state` (from `get_state`, or a checkpoint of any
    earlier release) was saved after, as grain turns a zero-worker DataLoader state into
    `{"next_index": (last_seen + count - index) // count}`; ValueError for a state of grain's per-worker
    layout or one saved between batches."""
    index, count = self._shard
    saved = json.loads(state)
    if saved.get("worker_count", 0) != 0 or set(saved.get("last_seen_indices", {})) != {"0"}:
      raise ValueError(f"a data-iterator state of another layout: {saved.get('last_seen_indices')}")
    next_record = (saved["last_seen_indices"]["0"] + count - index) // count
    if next_record % self._per_step:
      raise ValueError(f"a data-iterator state between batches (record {next_record}, {self._per_step} per step)")
    self.seek(next_record // self._per_step)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after `set_state`; the workers start on the next batch."""


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
