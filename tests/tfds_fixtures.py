"""One TFDS builder for the tests: a dataset written from features and example generators given by
the test, prepared as array_record without TensorFlow, then read back without its code (as a
user's dataset is)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import tensorflow_datasets as tfds


class TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The features and each split's examples come from the subclass `prepare` makes; example keys
  are the examples' positions. Not registered: the tests read the prepared folder by name."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None
  FEATURES: Mapping[str, tfds.features.FeatureConnector] = {}
  SPLITS: Mapping[str, Callable[[], Iterable[dict[str, Any]]]] = {}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(self.FEATURES)))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(examples) for split, examples in self.SPLITS.items()}

  def _generate_examples(self, examples):
    yield from enumerate(examples())


def prepare(
  data_dir: str,
  name: str,
  features: Mapping[str, tfds.features.FeatureConnector],
  splits: Mapping[str, Callable[[], Iterable[dict[str, Any]]]],
) -> str:
  """Writes the TFDS dataset `name` (version 1.0.0) into `data_dir` as array_record: `features`
  (the FeaturesDict's entries) and, per split, a function returning its examples. Returns `data_dir`."""
  builder = type(
    "".join(part.title() for part in name.split("_")),
    (TinyBuilder,),
    {"name": name, "FEATURES": features, "SPLITS": splits, "__module__": __name__},
    skip_registration=True,
  )
  builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)
