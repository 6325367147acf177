"""A user's TFDS dataset, prepared as array_record in a data dir, read without its builder's code.

`open_tfds(name, data_dir, config=None, version=None)` finds `DATA_DIR/NAME[/CONFIG]/VERSION`
(the newest version when none is named), opens it with `tfds.builder_from_directory` (so the
dataset's Python code need not be importable, and TensorFlow is not needed), checks its files
(`prepared.check_files`) and returns its random-access splits (`tfds.data_source`'s readers).

`FeatureSource` turns a split's records into the records the experiments read: chosen features,
renamed, each through a converter (text as `str`, labels as int64, images resized, arrays as is).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from multimodal_jax.data import image_files, prepared
from multimodal_jax.errors import UserError

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir() -> str:
  """TFDS's default data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _build_command(name: str, data_dir: str) -> str:
  return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def _versions(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  found = [
    v for v in os.listdir(folder) if _VERSION.match(v) and os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
  ]
  return sorted(found, key=lambda v: tuple(int(p) for p in v.split(".")))


def find_prepared(name: str, data_dir: str, config: str | None = None, version: str | None = None) -> str:
  """The folder of the prepared dataset `name` (`config`, `version`) in `data_dir`.

  Raises:
    UserError: no such dataset, config or version is prepared there (the message lists what is).
  """
  spec = f"tfds:{name}" + (f":{config}" if config else "") + (f"@{version}" if version else "")
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    there = sorted(d for d in os.listdir(data_dir) if not d.startswith(".")) if os.path.isdir(data_dir) else []
    shown = ", ".join(there[:10]) or "nothing"
    raise UserError(
      f"{spec}: no prepared dataset {name!r} in the data dir {data_dir} (it holds: {shown}); prepare it with "
      f"`{_build_command(name, data_dir)}` or point --config.data_dir at the folder that holds it"
    )
  configs = sorted(d for d in os.listdir(root) if _versions(os.path.join(root, d)) and not _VERSION.match(d))
  if config:
    if config not in configs:
      raise UserError(
        f"{spec}: {name} has no prepared config {config!r} in {data_dir} (prepared: {', '.join(configs) or 'none'})"
      )
    root = os.path.join(root, config)
  elif not _versions(root):
    if len(configs) != 1:
      raise UserError(
        f"{spec}: {name} has several configs prepared in {data_dir} ({', '.join(configs) or 'none whole'}): name one "
        f"as tfds:{name}:CONFIG"
      )
    root = os.path.join(root, configs[0])
  versions = _versions(root)
  if not versions:
    raise UserError(
      f"{spec}: {root} holds no complete prepared version (an interrupted build?): delete it and prepare it again "
      f"with `{_build_command(name, data_dir)}`"
    )
  if version and version not in versions:
    raise UserError(f"{spec}: version {version} is not prepared in {root} (prepared: {', '.join(versions)})")
  return os.path.join(root, version or versions[-1])


@dataclasses.dataclass
class TfdsData:
  """A prepared TFDS dataset: `spec` as named, its `builder`, `features` and random-access `splits`."""

  spec: str
  builder: Any
  splits: dict[str, Any]

  @property
  def features(self) -> Any:
    return self.builder.info.features

  def feature(self, key: str, setting: str) -> Any:
    """The feature `key`; a UserError naming the config key `setting` when the dataset lacks it."""
    if key not in self.features:
      names = ", ".join(sorted(self.features.keys()))
      raise UserError(f"{self.spec} has no feature {key!r} (its features: {names}): set --config.{setting}")
    return self.features[key]

  def split(self, name: str) -> Any:
    if name not in self.splits:
      raise UserError(f"{self.spec} has no split {name!r} (its splits: {', '.join(sorted(self.splits))})")
    return self.splits[name]

  def class_names(self, label_key: str, setting: str = "label_key") -> tuple[str, ...]:
    """The names of the ClassLabel feature `label_key`."""
    import tensorflow_datasets as tfds

    feature = self.feature(label_key, setting)
    if not isinstance(feature, tfds.features.ClassLabel):
      raise UserError(
        f"{self.spec}: the feature {label_key!r} is a {type(feature).__name__}, not a ClassLabel: set "
        f"--config.{setting} to the dataset's class label feature"
      )
    return tuple(feature.names)


def open_tfds(name: str, data_dir: str, config: str | None = None, version: str | None = None) -> TfdsData:
  """The prepared dataset (see the module docstring).

  Raises:
    UserError: it is not prepared in `data_dir`, not prepared as array_record, or its files are damaged.
  """
  import tensorflow_datasets as tfds

  spec = f"tfds:{name}" + (f":{config}" if config else "") + (f"@{version}" if version else "")
  folder = find_prepared(name, data_dir, config, version)
  try:
    builder = tfds.builder_from_directory(folder)
  except Exception as e:  # noqa: BLE001  any failure to read its metadata means the same to the user
    reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
    raise UserError(f"{spec}: the metadata in {folder} cannot be read ({reason}): prepare the dataset again") from None
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format != "array_record":
    raise UserError(
      f"{spec} is prepared as {file_format} in {folder}, which random access cannot read: prepare it again with "
      f"`{_build_command(name, data_dir)}`"
    )
  prepared.check_files(builder, rebuild=f"delete {folder} and prepare it again with `{_build_command(name, data_dir)}`")
  return TfdsData(spec=spec, builder=builder, splits=dict(builder.as_data_source()))


# Converters of one feature's decoded value (module-level functions, so sources stay picklable for
# grain's worker processes).


def as_text(value: Any) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def as_label(value: Any) -> np.ndarray:
  return np.asarray(value, np.int64)


def as_array(value: Any) -> np.ndarray:
  return np.asarray(value)


def image_converter(size: int, channels: int) -> Callable[[Any], np.ndarray]:
  """Decoded image pixels -> uint8 `[size, size, channels]` (`image_files.preprocess_array`)."""
  return functools.partial(image_files.preprocess_array, size=size, channels=channels)


class FeatureSource:
  """Records `{name: convert(record[feature_key])}` of a random-access `source`, for
  `fields = {name: (feature_key, convert)}`."""

  def __init__(self, source: Any, fields: Mapping[str, tuple[str, Callable[[Any], Any]]]):
    self._source = source
    self._fields = dict(fields)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    record = self._source[int(i)]
    return {name: convert(record[key]) for name, (key, convert) in self._fields.items()}

  def __repr__(self) -> str:
    fields = ", ".join(f"{name}<-{key}" for name, (key, _) in self._fields.items())
    return f"FeatureSource({self._source!r}, {fields})"
