"""Opening a prepared TFDS dataset (array_record files) after checking that its files are whole.

A truncated or damaged array_record file otherwise fails at its first read, deep inside a
training or evaluation step, with the record reader's error. Opening each shard's reader reads
its footer and index, so checking every shard's record count against the dataset's metadata is
cheap (no records are decoded) and catches a file cut short by a full disk or an interrupted copy.
"""

from __future__ import annotations

import os
from typing import Any

from multimodal_jax.errors import UserError


class DamagedDataError(UserError):
  """A prepared dataset's files do not match its metadata; the message says how to rebuild it."""


def check_files(builder: Any, rebuild: str | None = None) -> None:
  """DamagedDataError naming the first shard of `builder`'s prepared data that is missing,
  unreadable or holds another number of records than its metadata says.

  `rebuild` says how to prepare the data again (default: delete its folder and rerun)."""
  from array_record.python import array_record_module

  folder = str(builder.data_path)
  fix = rebuild or f"delete {folder} and rerun to prepare it again"
  for split_name, split in builder.info.splits.items():
    lengths = list(split.shard_lengths) or [None] * len(split.filepaths)
    for path, expected in zip(split.filepaths, lengths, strict=False):
      path = str(path)
      name = f"{builder.name} ({split_name} split, {os.path.basename(path)})"
      if not os.path.isfile(path):
        raise DamagedDataError(f"the prepared data of {name} is missing in {folder}: {fix}")
      try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
          count = reader.num_records()
        finally:
          reader.close()
      except (RuntimeError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise DamagedDataError(f"the prepared data of {name} is damaged ({reason}): {fix}") from None
      if expected is not None and count != expected:
        raise DamagedDataError(
          f"the prepared data of {name} holds {count} records where its metadata says {expected} (a truncated "
          f"file?): {fix}"
        )


def data_sources(builder: Any, rebuild: str | None = None) -> dict:
  """`builder.as_data_source()` after `check_files`: {split: random-access source}."""
  check_files(builder, rebuild)
  return builder.as_data_source()
