"""One way to name a dataset, for every experiment: `--config.dataset=SPEC`.

SPEC is one of
  tfds:NAME[:CONFIG][@VERSION]  a TFDS dataset prepared as array_record in `--config.data_dir`
  csv:PATH                      image-caption pairs, open_clip's CSV convention (`file_lists`)
  folder:DIR                    class sub-folders, torchvision's ImageFolder convention (`file_lists`)
  wds:PATTERN                   webdataset tar shards read in place (`wds`): DIR/{000..099}.tar, gs://...
  NAME                          one of the embedded datasets the experiment names (handled by it)

`parse_spec` checks the grammar; `open_dataset` opens a non-embedded spec as a `Dataset`: random-
access splits of records `{"image": uint8 [size, size, channels], "text": str, "label": int64}` (the
fields the dataset has and the caller asks for). CSV and folder images are decoded once into the
image cache in the data dir (`image_cache`); TFDS images and webdataset shards' images are decoded and
resized as they are read (the shards' indexes are cached in DATA_DIR/wds_index, the images not copied).

`config_keys()` / `config_rules()` are the config keys these settings read, with defaults and rules,
for an experiment to merge into its own config.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

from multimodal_jax.config import TEXT, Rule, one_of
from multimodal_jax.data import file_lists, image_cache, image_files, tfds_source, wds
from multimodal_jax.errors import UserError

KINDS = ("tfds", "csv", "folder", "wds")
_TFDS = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(?::(?P<config>[A-Za-z0-9_.\-]+))?(?:@(?P<version>\d+\.\d+\.\d+))?$")
_SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
FIELDS = ("image", "text", "label")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed SPEC: `kind` is tfds, csv, folder, wds or embedded; `name` the TFDS or embedded name,
  the path of a CSV file or folder, or the shard pattern (which may hold ':', as gs://, and braces)."""

  kind: str
  name: str
  config: str | None = None
  version: str | None = None

  def __str__(self) -> str:
    if self.kind == "embedded":
      return self.name
    if self.kind == "tfds":
      return (
        f"tfds:{self.name}" + (f":{self.config}" if self.config else "") + (f"@{self.version}" if self.version else "")
      )
    return f"{self.kind}:{self.name}"


def parse_spec(text: str, embedded: Sequence[str] = (), key: str = "dataset") -> Spec:
  """`text` as a Spec; a one-line UserError (naming `--config.KEY`) when it follows no form."""
  text = text.strip()
  forms = _forms(embedded, "one of ")
  if text in embedded:
    return Spec("embedded", text)
  kind, sep, rest = text.partition(":")
  if not sep or kind not in KINDS:
    raise UserError(f"--config.{key}={text}: expected {forms}")
  if not rest:
    raise UserError(f"--config.{key}={text}: the {kind}: spec names nothing; expected {forms}")
  if kind == "tfds":
    match = _TFDS.match(rest)
    if not match:
      raise UserError(
        f"--config.{key}={text}: expected tfds:NAME[:CONFIG][@VERSION] with a lower-case TFDS name (letters, digits, "
        "_) and a version such as 1.0.0, e.g. tfds:mnist or tfds:cifar10@3.0.2"
      )
    return Spec("tfds", match["name"], match["config"], match["version"])
  return Spec(kind, os.path.expanduser(rest))


def spec_rule(embedded: Sequence[str] = (), optional: bool = False) -> Rule:
  """A config rule accepting any SPEC (and "" with `optional`); `validate` then reports the form."""

  def test(value):
    if optional and value == "":
      return True
    parse_spec(value, embedded)  # raises its own one-line message
    return True

  return Rule(test, _forms(embedded))


def _forms(embedded: Sequence[str], lead: str = "") -> str:
  """The SPEC forms, for messages."""
  forms = "tfds:NAME[:CONFIG][@VERSION], csv:PATH, folder:DIR"
  wds_form = "wds:PATTERN (webdataset tar shards)"
  return f"{forms} or {lead}{', '.join(embedded)}; or {wds_form}" if embedded else f"{forms} or {wds_form}"


def separator(text: str) -> str:
  """`--config.csv_separator`: one character, or tab, comma, semicolon, pipe, space (or a typed \\t)."""
  value = _SEPARATORS.get(text, text)
  if len(value) != 1:
    raise UserError(f"--config.csv_separator={text}: expected one character, or tab, comma, semicolon, pipe or space")
  return value


def config_keys(**defaults: Any) -> dict[str, Any]:
  """The data settings' config keys with their defaults (`defaults` overrides them)."""
  keys = {
    "data_dir": "",  # TFDS data dir and the image cache's home; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    "image_key": "image",  # TFDS feature names
    "text_key": "text",
    "label_key": "label",
    "csv_image_key": "filepath",  # CSV column names (open_clip's defaults)
    "csv_caption_key": "title",
    "csv_separator": "tab",
    "image_size": 224,
    "channels": 3,
    "image_mean": "openai",  # openai, imagenet, dataset or comma-separated numbers
    "image_std": "openai",
    "data_workers": -1,  # grain worker processes; -1: auto (pipeline.worker_count)
  }
  unknown = set(defaults) - set(keys)
  if unknown:
    raise ValueError(f"config_keys has no keys {sorted(unknown)}")
  keys.update(defaults)
  return keys


def _normalization_ok(value: str) -> bool:
  if value in (*image_files.PRESETS, "dataset"):
    return True
  return all(float(v) >= 0 for v in value.split(","))


def config_rules() -> dict[str, Rule]:
  """The rule of each key of `config_keys`."""
  name = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a feature or column name")
  norm = Rule(_normalization_ok, "openai, imagenet, dataset or comma-separated numbers in [0, 1] units")
  return {
    "data_dir": TEXT,
    "image_key": name,
    "text_key": name,
    "label_key": name,
    "csv_image_key": name,
    "csv_caption_key": name,
    "csv_separator": Rule(lambda v: bool(separator(v)), "one character, or tab, comma, semicolon, pipe or space"),
    "image_size": Rule(lambda v: isinstance(v, int) and 8 <= v <= 4096, "an image side in pixels from 8 to 4096"),
    "channels": one_of(1, 3),
    "image_mean": norm,
    "image_std": norm,
    "data_workers": Rule(
      lambda v: isinstance(v, int) and v >= -1, "an integer >= 0 (0: read in the main process), or -1 (auto)"
    ),
  }


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """The settings `open_dataset` reads (see `config_keys` for their meaning)."""

  image_size: int = 224
  channels: int = 3
  data_dir: str = ""
  image_key: str = "image"
  text_key: str = "text"
  label_key: str = "label"
  csv_image_key: str = "filepath"
  csv_caption_key: str = "title"
  csv_separator: str = "tab"

  @classmethod
  def from_config(cls, config: Any) -> DataSettings:
    """The fields that `config` has (the others keep their defaults)."""
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

  @property
  def root(self) -> str:
    return self.data_dir or tfds_source.default_data_dir()


@dataclasses.dataclass
class Dataset:
  """An opened SPEC: random-access `splits`, `class_names` (or None) and the `fields` of its records.

  CSV, folder and wds sources have one set of records, returned for any split name.
  """

  spec: Spec
  splits: dict[str, Any]
  fields: tuple[str, ...]
  class_names: tuple[str, ...] | None = None

  def split(self, name: str) -> Any:
    if self.spec.kind != "tfds":
      return next(iter(self.splits.values()))
    if name not in self.splits:
      raise UserError(f"{self.spec} has no split {name!r} (its splits: {', '.join(sorted(self.splits))})")
    return self.splits[name]

  def paths(self, split: str) -> list[str] | None:
    """The image file of each record of `split` (None for TFDS)."""
    return getattr(self.split(split), "paths", None)

  def normalization(self, mean: str, std: str, channels: int, split: str = "train", limit: int = 10_000):
    """(mean, std) per channel from the `image_mean` / `image_std` settings; `dataset` is computed
    from `split` (all of a cached split, at most `limit` evenly spaced images of a TFDS split)."""
    source = self.split(split)
    if isinstance(source, image_cache.CachedImages):
      statistics = source.statistics
    else:
      step = max(1, len(source) // limit)
      statistics = lambda: image_files.image_statistics(
        (source[i]["image"] for i in range(0, len(source), step)), channels
      )
    return image_files.normalization(mean, std, channels, statistics)


def open_dataset(
  spec: Spec | str,
  settings: DataSettings,
  need: Sequence[str] = ("image",),
  want: Sequence[str] = (),
  *,
  resample: bool = True,
) -> Dataset:
  """Opens a tfds, csv, folder or wds SPEC whose records carry the fields `need` and, where the dataset
  has them, `want` (fields: image, text, label).

  A wds sample that cannot be used (an undecodable image, a caption or label that does not parse) is
  replaced by a usable one with `resample` (training: batches stay full and deterministic); without it,
  it is returned with `valid=False` and a zero image for the caller to drop (`WdsSource.usable` leaves
  them out before an evaluation). A wds sample lacking a member of a field in the Dataset's `fields` is
  left out at open.

  Raises:
    UserError: anything about the data the user can fix (one line naming it and the fix).
  """
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  unknown = (set(need) | set(want)) - set(FIELDS)
  if unknown:
    raise ValueError(f"open_dataset fields are {FIELDS}, got {sorted(unknown)}")
  if spec.kind == "embedded":
    raise ValueError(f"{spec} is an embedded dataset: its experiment loads it")
  if spec.kind == "tfds":
    return _open_tfds(spec, settings, need, want)
  if spec.kind == "wds":
    return _open_wds(spec, settings, need, want, resample)
  has = ("image", "text") if spec.kind == "csv" else ("image", "label")
  missing = [f for f in need if f not in has]
  if missing:
    what = {"text": "captions", "label": "class labels", "image": "images"}
    raise UserError(
      f"{spec} has no {', '.join(what[f] for f in missing)}, which this use needs: "
      + ("use a csv: spec of image-caption pairs" if "text" in missing else "use a folder: or tfds: spec with classes")
    )
  if spec.kind == "csv":
    items, fingerprint = file_lists.csv_items(
      spec.name, settings.csv_image_key, settings.csv_caption_key, separator(settings.csv_separator)
    )
    class_names = None
  else:
    items, class_names, fingerprint = file_lists.folder_items(spec.name)
  cached = image_cache.prepare(
    items,
    size=settings.image_size,
    channels=settings.channels,
    cache_dir=os.path.join(settings.root, "image_cache"),
    name=file_lists.cache_name(spec.kind, spec.name),
    fingerprint=fingerprint,
    source=str(spec),
    class_names=class_names,
  )
  return Dataset(spec=spec, splits={"all": cached}, fields=has, class_names=class_names)


def _open_tfds(spec: Spec, settings: DataSettings, need: Sequence[str], want: Sequence[str]) -> Dataset:
  data = tfds_source.open_tfds(spec.name, settings.root, spec.config, spec.version)
  keys = {"image": (settings.image_key, "image_key"), "text": (settings.text_key, "text_key")}
  keys["label"] = (settings.label_key, "label_key")
  converters = {
    "image": tfds_source.image_converter(settings.image_size, settings.channels),
    "text": tfds_source.as_text,
    "label": tfds_source.as_label,
  }
  fields = {}
  for field in FIELDS:
    key, setting = keys[field]
    if field in need:
      data.feature(key, setting)  # a one-line error when missing
    elif field not in want or key not in data.features:
      continue
    fields[field] = (key, converters[field])
  class_names = data.class_names(settings.label_key) if "label" in fields else None
  splits = {name: tfds_source.FeatureSource(source, fields) for name, source in data.splits.items()}
  return Dataset(spec=spec, splits=splits, fields=tuple(fields), class_names=class_names)


_WDS_MEMBERS = {"text": "caption", "label": "label"}  # the WdsSource `need` of a field


def _open_wds(spec: Spec, settings: DataSettings, need: Sequence[str], want: Sequence[str], resample: bool) -> Dataset:
  """webdataset shards, their indexes cached in DATA_DIR/wds_index; captions are the records' `text`."""
  source = wds.open_wds(
    spec.name,
    os.path.join(settings.root, "wds_index"),
    settings.image_size,
    settings.channels,
    need=(),
    caption_field="text",
    resample=resample,
  )
  has = {"image": True, "text": source.has_captions, "label": source.has_labels}
  missing = [f for f in need if not has[f]]
  if missing:
    what = {"text": "captions (KEY.txt or KEY.json members)", "label": "class labels (KEY.cls members)"}
    raise UserError(f"{spec} has no {' or '.join(what[f] for f in missing)}, which this use needs: check the shards")
  fields = tuple(f for f in FIELDS if f in need or (f in want and has[f]))
  source = source.requiring([_WDS_MEMBERS[f] for f in fields if f in _WDS_MEMBERS])
  if source.incomplete_samples:
    wanted = " or ".join(_WDS_MEMBERS[f] for f in fields if f in _WDS_MEMBERS)
    print(f"note: {source.incomplete_samples} samples of {spec} have no {wanted} member and are left out", flush=True)
  return Dataset(spec=spec, splits={"all": source}, fields=fields, class_names=source.class_names)
