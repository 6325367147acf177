"""Fusion on a user's TFDS dataset: a dataset written here (an image, a sequence and a vector per
example, a ClassLabel; tests/tfds_fixtures.py builds it), encoders chosen by each feature's rank, training and evaluation through the
command line, and one-line errors for keys the dataset does not have."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import linen as nn
from PIL import Image

from multimodal_jax.fusion import config as fusion_config
from multimodal_jax.fusion import data as fusion_data
from multimodal_jax.fusion import model as fusion_model
from multimodal_jax.fusion import run as fusion_run_mod
from tests import tfds_fixtures

CLASSES = ["circle", "square", "triangle"]


FEATURES = {
  "photo": tfds.features.Image(shape=(8, 8, 3)),
  "readings": tfds.features.Tensor(shape=(12, 4), dtype=np.float32),
  "stats": tfds.features.Tensor(shape=(6,), dtype=np.float32),
  "note": tfds.features.Text(),
  "label": tfds.features.ClassLabel(names=CLASSES),
  "weight": tfds.features.Tensor(shape=(), dtype=np.int64),
}


def _examples(n, seed):
  """Three classes; each example has a small picture, a [T, F] reading and a vector of the class."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    label = i % 3
    photo = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
    photo[..., label] += 150  # the class's colour channel is bright
    readings = rng.normal(size=(12, 4)).astype(np.float32) + label
    stats = rng.normal(size=6).astype(np.float32) + 2 * label
    yield {
      "photo": Image.fromarray(photo),
      "readings": readings,
      "stats": stats,
      "note": f"example {i}",
      "label": label,
      "weight": 1,
    }


def prepare_sensors(data_dir) -> str:
  """The dataset fusion_test_sensors (64 train, 24 test examples) in `data_dir`."""
  splits = {"train": lambda: _examples(64, 0), "test": lambda: _examples(24, 1)}
  return tfds_fixtures.prepare(data_dir, "fusion_test_sensors", FEATURES, splits)


@pytest.fixture(scope="module")
def sensors_dir(tmp_path_factory):
  return prepare_sensors(tmp_path_factory.mktemp("fusion_tfds"))


def _args(workdir, data_dir, *extra):
  return [
    "--workdir",
    str(workdir),
    "--config.dataset=tfds:fusion_test_sensors",
    f"--config.data_dir={data_dir}",
    "--config.batch_size=16",
    "--config.eval_batch_size=8",
    "--config.mesh=data:8",
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.warmup_steps=1",
    *extra,
  ]


def test_encoders_follow_the_features_rank(sensors_dir):
  config = fusion_config.get_config()
  config.dataset, config.data_dir = "tfds:fusion_test_sensors", sensors_dir
  config.modalities = "picture:photo,series:readings,summary:stats"
  data = fusion_data.load_data(config)
  assert data.num_classes == 3 and data.by_rank
  assert data.shapes == {"picture": (8, 8, 3), "series": (12, 4), "summary": (6,)}
  record = data.train[0]
  assert set(record) == {"picture", "series", "summary", "label"}
  assert record["picture"].dtype == np.uint8 and record["label"].dtype == np.int64
  model = fusion_model.build_model(config, data)
  example = {k: np.asarray(v)[None] for k, v in record.items()}
  params = nn.unbox(
    jax.eval_shape(
      lambda: model.init(
        {"params": jax.random.key(0)}, fusion_data.model_inputs(example, fusion_data.modalities_of(config))
      )
    )["params"]
  )
  assert params["encoders_picture"]["conv_0"]["kernel"].shape == (3, 3, 3, 16)  # 2-D convolutions
  assert params["encoders_series"]["conv_0"]["kernel"].shape == (3, 4, 32)  # 1-D convolutions over time
  assert params["encoders_summary"]["hidden"]["kernel"].shape == (6, config.hidden)  # an MLP
  assert params["g"]["out"]["kernel"].shape[-1] == 3


@pytest.mark.parametrize("fusion_kind", ["joint", "early", "late"])
@pytest.mark.slow  # ~50 s each under load: training and evaluation runs through main
def test_train_and_evaluate_through_the_cli(tmp_path, sensors_dir, capsys, fusion_kind):
  modalities = "--config.modalities=picture:photo,summary:stats"
  status = fusion_run_mod.main(
    _args(tmp_path, sensors_dir, "--config.steps=6", f"--config.fusion={fusion_kind}", modalities)
  )
  out = capsys.readouterr()
  assert status == 0, out.err[-2000:]
  trained = json.loads(out.out.strip().splitlines()[-1])
  assert trained["step"] == 6
  evaluate = [
    "--workdir",
    str(tmp_path),
    "--mode=eval",
    f"--config.data_dir={sensors_dir}",
    "--config.mesh=data:4,fsdp:2",
  ]
  status = fusion_run_mod.main(evaluate)
  out = capsys.readouterr()
  assert status == 0, out.err[-2000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["step"] == 6 and result["modalities"] == "picture,summary"
  keys = {"accuracy", "accuracy_without_picture", "accuracy_without_summary"}
  assert keys <= set(result) and all(0.0 <= result[k] <= 1.0 for k in keys)
  assert result["accuracy"] == pytest.approx(trained["accuracy"])  # the same params on another mesh
  assert result["accuracy"] * 24 == pytest.approx(round(result["accuracy"] * 24))  # a share of the 24 test examples


@pytest.mark.slow
def test_a_sequence_modality_alone_learns(tmp_path, sensors_dir, capsys):
  args = _args(tmp_path, sensors_dir, "--config.steps=40", "--config.modalities=series:readings")
  assert fusion_run_mod.main([*args, "--config.learning_rate=0.01", "--config.checkpoint_every=40"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["accuracy"] > 0.6  # chance is 1/3; the readings' mean tells the class


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--config.modalities=picture:photo,smell:odour"], "has no feature 'odour' (its features: label, note, photo"),
    (["--config.modalities=picture:photo,text:note"], "the feature 'note' is not numeric"),
    (["--config.modalities=picture:photo", "--config.label_key=weight"], "'weight' is a Tensor, not a ClassLabel"),
    (["--config.modalities=picture:photo", "--config.label_key=kind"], "has no feature 'kind'"),
    (["--config.modalities=picture:photo", "--config.eval_split=validation"], "has no split 'validation'"),
    (["--config.modalities=a:photo,a:stats"], "--config.modalities=a:photo,a:stats: expected a comma list"),
  ],
)
def test_bad_keys_are_one_line(tmp_path, sensors_dir, capsys, extra, message):
  status = fusion_run_mod.main(_args(tmp_path / "run", sensors_dir, "--config.steps=2", *extra))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and message in err[0], err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_tfds_name_and_av_digits_modalities_are_one_line(tmp_path, sensors_dir, capsys):
  status = fusion_run_mod.main(
    _args(tmp_path, sensors_dir, "--config.dataset=tfds:nothing_here", "--config.modalities=a")
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "no prepared dataset 'nothing_here'" in err[0]
  assert "fusion_test_sensors" in err[0]  # what the data dir does hold
  status = fusion_run_mod.main(["--workdir", str(tmp_path), "--config.modalities=image:audio"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "av_digits has the modalities audio, image" in err[0]
