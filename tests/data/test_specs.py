"""Naming a dataset by SPEC: the grammar, CSV pairs and class folders through the image cache, a TFDS
dataset built in the test and read without its code, and one-line errors for every bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from multimodal_jax.data import image_cache, specs
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.errors import UserError
from tests import tfds_fixtures

EMBEDDED = ("captioned_digits", "av_digits")


# ------------------------------------------------------------------ grammar


@pytest.mark.parametrize(
  "text, expected",
  [
    ("tfds:mnist", specs.Spec("tfds", "mnist")),
    ("tfds:cifar10@3.0.2", specs.Spec("tfds", "cifar10", None, "3.0.2")),
    ("tfds:my_set:tiny", specs.Spec("tfds", "my_set", "tiny")),
    ("tfds:my_set:tiny@1.2.0", specs.Spec("tfds", "my_set", "tiny", "1.2.0")),
    ("csv:/data/pairs.tsv", specs.Spec("csv", "/data/pairs.tsv")),
    ("csv:with:colon.csv", specs.Spec("csv", "with:colon.csv")),
    ("folder:my images/test", specs.Spec("folder", "my images/test")),
    ("captioned_digits", specs.Spec("embedded", "captioned_digits")),
  ],
)
def test_specs_parse(text, expected):
  spec = specs.parse_spec(text, EMBEDDED)
  assert spec == expected
  assert str(spec) == text


@pytest.mark.parametrize(
  "text, message",
  [
    ("mnist", "expected tfds:NAME[:CONFIG][@VERSION], csv:PATH, folder:DIR or one of captioned_digits"),
    ("hf:mnist", "--config.dataset=hf:mnist: expected tfds:"),
    ("csv:", "names nothing"),
    ("tfds:MNIST", "lower-case TFDS name"),
    ("tfds:mnist@latest", "a version such as 1.0.0"),
    ("tfds:mnist:a:b", "tfds:NAME[:CONFIG][@VERSION]"),
  ],
)
def test_bad_specs_are_one_line(text, message):
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
    specs.parse_spec(text, EMBEDDED)
  assert "\n" not in str(info.value)


def test_config_keys_follow_their_rules():
  keys, rules = specs.config_keys(image_size=32), specs.config_rules()
  assert set(keys) == set(rules) and keys["image_size"] == 32
  for key, value in keys.items():
    rules[key].check(key, value)
  for key, bad in [("channels", 2), ("csv_separator", "ab"), ("image_mean", "purple"), ("data_workers", -2)]:
    with pytest.raises(UserError, match=f"--config.{key}="):
      rules[key].check(key, bad)
  assert specs.separator("tab") == "\t" and specs.separator("\\t") == "\t" and specs.separator(",") == ","


# ------------------------------------------------------------------ CSV and folders


def _image(path, mode, size, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.new("RGB", size, (value, value, value))
  image = image.quantize(colors=4) if mode == "P" else image.convert(mode)
  image.save(path)


def _pairs_csv(tmp_path, n=12, separator="\t", name="pairs.tsv"):
  """n PNG/JPEG files of mixed modes and sizes with captions, listed by a CSV with relative paths."""
  modes = ["L", "LA", "RGB", "RGBA", "P"]
  rows = [f"filepath{separator}title"]
  for i in range(n):
    file = f"img/{i:03d}." + ("jpg" if i % 6 == 5 else "png")
    _image(tmp_path / file, "RGB" if file.endswith("jpg") else modes[i % 5], (20 + i, 30), 10 * i)
    rows.append(f"{file}{separator}a picture of number {i}")
  path = tmp_path / name
  path.write_text("\n".join(rows) + "\n")
  return path


def _settings(tmp_path, **kw):
  return specs.DataSettings(image_size=16, channels=3, data_dir=str(tmp_path / "data"), **kw)


def test_csv_pairs_through_the_cache(tmp_path, capsys):
  path = _pairs_csv(tmp_path)
  data = specs.open_dataset(f"csv:{path}", _settings(tmp_path), need=("image", "text"))
  assert "prepared 12 images of csv:" in capsys.readouterr().out
  source = data.split("train")
  assert isinstance(source, image_cache.CachedImages) and len(source) == 12
  assert data.fields == ("image", "text") and data.class_names is None
  record = source[7]
  assert record["image"].dtype == np.uint8 and record["image"].shape == (16, 16, 3)
  assert np.abs(record["image"].astype(int) - 70).max() <= 2
  assert record["text"] == "a picture of number 7" and isinstance(record["text"], str)
  assert data.paths("train")[7] == str(tmp_path / "img" / "007.png")
  # A second open reuses the cache; a change to the CSV prepares a new one.
  again = specs.open_dataset(f"csv:{path}", _settings(tmp_path), need=("image", "text"))
  assert again.split("train").folder == source.folder and "prepared" not in capsys.readouterr().out
  path.write_text(path.read_text().replace("number 7", "number seven"))
  changed = specs.open_dataset(f"csv:{path}", _settings(tmp_path), need=("image", "text"))
  assert (
    changed.split("train").folder != source.folder and changed.split("train")[7]["text"] == "a picture of number seven"
  )
  gray = specs.open_dataset(
    f"csv:{path}", specs.DataSettings(image_size=8, channels=1, data_dir=str(tmp_path / "data"))
  )
  assert gray.split("train")[0]["image"].shape == (8, 8, 1)


def test_csv_with_other_columns_and_separator(tmp_path):
  path = tmp_path / "pairs.csv"
  _image(tmp_path / "a b.png", "RGB", (10, 10), 40)
  path.write_text('path,caption,extra\n"a b.png","a dog, running",1\n')
  settings = _settings(tmp_path, csv_image_key="path", csv_caption_key="caption", csv_separator="comma")
  record = specs.open_dataset(f"csv:{path}", settings).split("train")[0]
  assert record["text"] == "a dog, running"
  with pytest.raises(UserError, match=r"has no column 'filepath' \(its header's columns: 'path', 'caption'"):
    specs.open_dataset(f"csv:{path}", _settings(tmp_path, csv_separator="comma"))
  with pytest.raises(UserError, match="or --config.csv_separator"):
    specs.open_dataset(f"csv:{path}", _settings(tmp_path))  # tab: one column


def test_unreadable_files_are_skipped_counted_and_logged(tmp_path, capsys):
  path = _pairs_csv(tmp_path, n=150)
  (tmp_path / "img" / "003.png").write_bytes(b"not a png")
  source = specs.open_dataset(f"csv:{path}", _settings(tmp_path)).split("train")
  out = capsys.readouterr().out
  assert len(source) == 149 and "1 unreadable file(s) skipped" in out
  log = out.strip().split("listed in ")[-1]
  assert os.path.isfile(log) and str(tmp_path / "img" / "003.png") in Path(log).read_text()
  assert source.unreadable == 1 and str(tmp_path / "img" / "003.png") not in source.paths


def test_more_than_one_percent_unreadable_is_one_line(tmp_path):
  path = _pairs_csv(tmp_path, n=150)
  (tmp_path / "img" / "003.png").write_bytes(b"not a png")
  os.remove(tmp_path / "img" / "004.png")
  with pytest.raises(UserError) as info:
    specs.open_dataset(f"csv:{path}", _settings(tmp_path))
  message = str(info.value)
  assert "2 of the 150 images of csv:" in message and "more than 1%" in message and "\n" not in message
  assert not [
    d for d in os.listdir(tmp_path / "data" / "image_cache") if os.path.isdir(tmp_path / "data" / "image_cache" / d)
  ]


@pytest.mark.parametrize(
  "write, message",
  [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("filepath\ttitle\n"), "has a header but no rows"),
    (lambda p: p.write_bytes(b"filepath\ttitle\n\xff\xfe\x00x\tb\n"), "is not UTF-8"),
    (lambda p: p.write_text("filepath\ttitle\nmissing1.png\ta\nmissing2.png\tb\n"), "2 of the 2 images"),
  ],
)
def test_bad_csv_is_one_line(tmp_path, write, message):
  path = tmp_path / "pairs.tsv"
  write(path)
  with pytest.raises(UserError, match=message) as info:
    specs.open_dataset(f"csv:{path}", _settings(tmp_path))
  assert "\n" not in str(info.value)


def _class_folder(root, classes):
  for c, (name, count) in enumerate(classes.items()):
    for i in range(count):
      _image(root / name / ("sub" if i % 2 else "") / f"{i}.png", "RGB", (12, 12), 20 * c)
  return root


def test_class_folders_in_sorted_order(tmp_path):
  root = _class_folder(tmp_path / "pets", {"tabby cat": 3, "Dog": 2, "axolotl": 1})
  (root / ".ipynb_checkpoints").mkdir()
  (root / "Dog" / "notes.txt").write_text("not an image")
  _image(root / "Dog" / ".hidden.png", "RGB", (12, 12), 0)
  data = specs.open_dataset(f"folder:{root}", _settings(tmp_path), need=("image", "label"))
  assert data.class_names == ("Dog", "axolotl", "tabby cat")  # sorted as str, as ImageFolder
  source = data.split("test")
  assert len(source) == 6
  labels = [int(source[i]["label"]) for i in range(len(source))]
  assert labels == [0, 0, 1, 2, 2, 2]
  assert os.path.basename(os.path.dirname(data.paths("test")[-1])) in ("tabby cat", "sub")
  value = {"tabby cat": 0, "Dog": 20, "axolotl": 40}  # the grey each class's images were drawn in
  for i in range(6):
    assert np.abs(source[i]["image"].astype(int) - value[data.class_names[labels[i]]]).max() <= 1
  assert source[0]["label"].dtype == np.int64 and "text" not in source[0]


def test_bad_folders_are_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  loose = tmp_path / "loose"
  _image(loose / "a.png", "RGB", (8, 8), 0)
  with_empty = _class_folder(tmp_path / "some", {"cat": 1})
  (with_empty / "dog").mkdir()
  cases = [
    ("folder:" + str(tmp_path / "nowhere"), "does not exist"),
    ("folder:" + str(tmp_path / "empty"), "holds no class sub-folders"),
    ("folder:" + str(loose), "its images lie loose in it"),
    ("folder:" + str(with_empty), "the class folder 'dog' holds no images"),
  ]
  for spec, message in cases:
    with pytest.raises(UserError, match=message) as info:
      specs.open_dataset(spec, _settings(tmp_path))
    assert "\n" not in str(info.value) and spec in str(info.value)
  with pytest.raises(UserError, match="has no captions"):
    specs.open_dataset(f"folder:{tmp_path / 'nowhere'}", _settings(tmp_path), need=("image", "text"))


def test_cache_plugs_into_grain_batches(tmp_path):
  root = _class_folder(tmp_path / "pets", {"cat": 8, "dog": 8})
  source = specs.open_dataset(f"folder:{root}", _settings(tmp_path)).split("train")
  batches = GrainBatches(source, 8, seed=0, process_index=0, process_count=1)
  epoch = [next(batches), next(batches)]  # 16 records: one epoch
  for batch in epoch:
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,)
    # catches images paired with the wrong label: cat's were drawn in grey 0, dog's in grey 20
    grey = np.asarray([20 * int(label) for label in batch["label"]])[:, None, None, None]
    assert np.abs(batch["image"].astype(int) - grey).max() <= 1
  rows = [(int(b["label"][i]), b["image"][i].tobytes()) for b in epoch for i in range(8)]
  records = [(int(source[i]["label"]), source[i]["image"].tobytes()) for i in range(len(source))]
  # catches a stream that drops, repeats or alters cached records within an epoch (labels in {0, 1} held
  # for any output): the epoch's rows are the cache's 16 records, each once
  assert sorted(rows) == sorted(records)


def test_dataset_normalization_from_the_cache(tmp_path):
  root = _class_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
  data = specs.open_dataset(f"folder:{root}", _settings(tmp_path))
  mean, std = data.normalization("dataset", "dataset", 3)
  assert mean == pytest.approx((10 / 255,) * 3, abs=1e-3) and std == pytest.approx((10 / 255,) * 3, abs=1e-3)
  assert os.path.isfile(os.path.join(data.split("train").folder, "statistics.json"))
  assert data.normalization("openai", "dataset", 3)[0][0] == pytest.approx(0.48145466)


# ------------------------------------------------------------------ TFDS


PAIRS_FEATURES = {
  "picture": tfds.features.Image(shape=(None, None, 3)),
  "caption": tfds.features.Text(),
  "label": tfds.features.ClassLabel(names=["red fox", "cat"]),
  "score": tfds.features.Tensor(shape=(), dtype=np.float32),
}


def _pairs(n):
  """Images of varying sizes with captions and class labels."""
  for i in range(n):
    pixels = np.full((10 + i, 14, 3), 30 * i, np.uint8)
    yield {"picture": Image.fromarray(pixels), "caption": f"thing {i}", "label": i % 2, "score": float(i)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("user_tfds")
  tfds_fixtures.prepare(
    data_dir, "spec_test_pairs", PAIRS_FEATURES, {"train": lambda: _pairs(6), "test": lambda: _pairs(3)}
  )
  return data_dir


def test_tfds_dataset_read_without_its_code(tfds_dir):
  settings = specs.DataSettings(
    image_size=8, channels=1, data_dir=str(tfds_dir), image_key="picture", text_key="caption"
  )
  data = specs.open_dataset("tfds:spec_test_pairs", settings, need=("image", "label"), want=("text",))
  assert data.class_names == ("red fox", "cat") and data.fields == ("image", "text", "label")
  train = data.split("train")
  assert len(train) == 6 and len(data.split("test")) == 3
  records = [train[i] for i in range(6)]
  by_caption = {r["text"]: r for r in records}
  assert set(by_caption) == {f"thing {i}" for i in range(6)}
  for i in range(6):
    record = by_caption[f"thing {i}"]
    assert record["image"].shape == (8, 8, 1) and record["image"].dtype == np.uint8
    assert abs(int(record["image"][0, 0, 0]) - 30 * i) <= 1
    assert record["label"].dtype == np.int64 and int(record["label"]) == i % 2
  assert data.paths("train") is None
  with pytest.raises(UserError, match="has no split 'validation'"):
    data.split("validation")
  same = specs.open_dataset("tfds:spec_test_pairs@1.0.0", settings, need=("image",))
  assert same.fields == ("image",)


@pytest.mark.parametrize(
  "spec, settings, message",
  [
    ("tfds:no_such_set", {}, "no prepared dataset 'no_such_set' in the data dir"),
    ("tfds:spec_test_pairs@2.0.0", {}, "version 2.0.0 is not prepared"),
    ("tfds:spec_test_pairs:big", {}, "has no prepared config 'big'"),
    (
      "tfds:spec_test_pairs",
      {},
      "has no feature 'image' (its features: caption, label, picture, score): set --config.image_key",
    ),
    ("tfds:spec_test_pairs", {"image_key": "picture", "label_key": "score"}, "'score' is a Tensor, not a ClassLabel"),
  ],
)
def test_bad_tfds_specs_are_one_line(tfds_dir, spec, settings, message):
  settings = specs.DataSettings(image_size=8, data_dir=str(tfds_dir), **settings)
  with pytest.raises(UserError) as info:
    specs.open_dataset(spec, settings, need=("image", "label"))
  assert message in str(info.value) and "\n" not in str(info.value)
  if "no prepared dataset" in message:
    assert "tfds build no_such_set" in str(info.value) and "spec_test_pairs" in str(info.value)


def test_damaged_or_tfrecord_tfds_data_is_one_line(tfds_dir, tmp_path):
  import shutil

  copy = tmp_path / "copy"
  shutil.copytree(tfds_dir, copy)
  folder = copy / "spec_test_pairs" / "1.0.0"
  shard = next(p for p in folder.iterdir() if "train.array_record" in p.name)
  shard.write_bytes(shard.read_bytes()[:40])
  settings = specs.DataSettings(image_size=8, data_dir=str(copy), image_key="picture")
  with pytest.raises(UserError, match="damaged|records where") as info:
    specs.open_dataset("tfds:spec_test_pairs", settings)
  assert "tfds build spec_test_pairs" in str(info.value)
  info_path = folder / "dataset_info.json"
  metadata = json.loads(info_path.read_text())
  metadata["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(metadata))
  with pytest.raises(UserError, match="is prepared as tfrecord"):
    specs.open_dataset("tfds:spec_test_pairs", settings)
