"""CLIP and latent diffusion on webdataset shards (`--config.dataset=wds:PATTERN`) through the command line:
training with an unusable sample logged as skipped_samples, exact resume, clip_benchmark-style zero-shot eval,
a missing shard as one line, latent diffusion's data loader. Tiny images, tiny CLIP, a few steps."""

import contextlib
import io
import json
import os
import shutil
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from multimodal_jax.clip import run as clip_run
from multimodal_jax.latent_diffusion import config as ld_config
from multimodal_jax.latent_diffusion.data import load_image_set

SIZE = 32  # the tiny CLIP's image side: shards hold images of this size or a little larger
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230)}
CLASSES = tuple(COLORS)
# A run: 16 records a step over 8 devices, 4 steps (2 epochs of 32 usable samples), a checkpoint every 2.
RUN = ["--config.steps=4", "--config.batch_size=16", "--config.log_every=1", "--config.checkpoint_every=2"]
RUN += ["--config.context_length=16"]


def _photo(rng, color, width=SIZE, height=SIZE):
  """A noisy patch of one colour (so that captions and class names say something about the pixels)."""
  base = np.asarray(COLORS[color], np.float32)
  pixels = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
  return Image.fromarray(pixels, "RGB")


def _encoded(image, fmt):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _write_tar(path, members):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _shards(folder, counts, seed, caption=True, label=False, corrupt=None):
  """Shards of `counts[i]` samples each (PNG and JPEG alternating, some 40x36: resized on read), captions as .txt
  (and one .json) and/or .cls labels; `corrupt`: the key of a sample whose image is not an image. Its pattern."""
  rng = np.random.default_rng(seed)
  number = 0
  for shard, count in enumerate(counts):
    members = []
    for _ in range(count):
      key, color = f"{number:05d}", CLASSES[number % 3]
      fmt = "PNG" if number % 2 else "JPEG"
      size = (40, 36) if number % 5 == 0 else (SIZE, SIZE)
      data = b"\xff\xd8 not a jpeg" if key == corrupt else _encoded(_photo(rng, color, *size), fmt)
      members.append((f"{key}.{'png' if fmt == 'PNG' else 'jpg'}", data))
      if caption and number == 3:
        members.append((f"{key}.json", json.dumps({"caption": f"a {color} square"}).encode()))
      elif caption:
        members.append((f"{key}.txt", f"a photo of something {color}".encode()))
      if label:
        members.append((f"{key}.cls", f"{number % 3}\n".encode()))
      number += 1
    _write_tar(os.path.join(folder, f"{shard:06d}.tar"), members)
  return os.path.join(folder, f"{{000000..{len(counts) - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Training shards (14 + 14 + 5 samples, one undecodable), eval shards in clip_benchmark's layout (test/0.tar,
  test/1.tar with .cls; classnames.txt one folder up; one undecodable) and the data dir the index cache goes to."""
  root = tmp_path_factory.mktemp("wds")
  train = _shards(str(root / "train"), [14, 14, 5], seed=0, corrupt="00017")
  evaluation = _shards(str(root / "eval" / "test"), [7, 5], seed=1, caption=False, label=True, corrupt="00004")
  (root / "eval" / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
  return {"train": train, "eval": evaluation, "data_dir": str(root / "data"), "root": root}


def _main(*argv):
  """`clip.run.main(argv)`: (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = clip_run.main([str(a) for a in argv])
  return status, out.getvalue(), err.getvalue()


def _train(workdir, data):
  status, out, err = _main(
    "--workdir", workdir, f"--config.dataset=wds:{data['train']}", f"--config.data_dir={data['data_dir']}", *RUN
  )
  assert status == 0, err[-3000:]
  return out


def _evaluate(workdir, data):
  status, out, err = _main("--workdir", workdir, "--mode=eval", f"--config.eval_dataset=wds:{data['eval']}")
  assert status == 0, err[-3000:]
  return out


def _metrics(workdir, keys=("step", "loss", "grad_norm", "skipped_samples")):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [[json.loads(line)[k] for k in keys] for line in f]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
  """One uninterrupted 4-step run, then its evaluation on the eval shards (stdout), shared by the tests."""
  workdir = tmp_path_factory.mktemp("full")
  _train(workdir, data)
  return workdir, _evaluate(workdir, data)


# Bug: wds: shards do not reach CLIP's training, the corrupt member crashes it or goes uncounted, or the images are
# copied into a cache (only the shard indexes should be written to the data dir).
@pytest.mark.slow  # a CLIP training run and its evaluation through main
def test_clip_trains_from_shards_and_logs_skipped_samples(data, full_run):
  lines = _metrics(full_run[0])
  assert [line[0] for line in lines] == [1, 2, 3, 4] and all(np.isfinite(line[1]) for line in lines)
  assert sum(line[3] for line in lines) >= 1  # 4 batches of 16 read each of the 33 samples, the corrupt one too
  indexes = [name for name in os.listdir(os.path.join(data["data_dir"], "wds_index")) if name.endswith(".npz")]
  assert {name.rpartition("-")[2] for name in indexes} >= {"000000.npz", "000001.npz", "000002.npz"}
  assert "image_cache" not in os.listdir(data["data_dir"])  # the images stay in the shards


# Bug: a resumed run's data stream restarts at a shard (or epoch) boundary instead of the exact sample, so the
# losses after the checkpoint (and the final params the evaluation reads) differ from an uninterrupted run's.
@pytest.mark.slow  # CLIP training runs through main; test_loop keeps resume bit-identical fast
def test_interrupted_and_resumed_run_is_bit_identical(data, full_run, tmp_path):
  workdir = tmp_path / "resumed"
  shutil.copytree(full_run[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")  # "interrupted" after step 2's checkpoint
  for name in ("eval.json", "predictions.jsonl"):
    os.remove(workdir / name)
  assert "resumed from the checkpoint at step 2" in _train(workdir, data)
  assert _metrics(workdir) == _metrics(full_run[0])
  _evaluate(workdir, data)
  assert (workdir / "predictions.jsonl").read_text() == (full_run[0] / "predictions.jsonl").read_text()


# Bug: clip_benchmark's eval shards (image + .cls, classnames.txt one folder up) are not evaluated zero-shot over
# their class names, or an undecodable sample is scored (as a miss) instead of being left out.
@pytest.mark.slow  # a CLIP training run and its evaluation through main
def test_zero_shot_eval_from_cls_shards_writes_eval_json(full_run):
  workdir, out = full_run
  result = json.loads((workdir / "eval.json").read_text())
  assert result["step"] == 4 and 0.0 <= result["zero_shot_accuracy"] <= 1.0
  assert result["num_images"] == 11  # 12 samples, one undecodable
  assert "1 samples of wds:" in out and "undecodable image" in out
  rows = [json.loads(line) for line in (workdir / "predictions.jsonl").read_text().splitlines()]
  assert len(rows) == 11 and all(row["path"].split("#")[1] != "00004" for row in rows)
  assert [row["label"] for row in rows] == [n % 3 for n in range(12) if n != 4]


# Bug: a shard that cannot be opened ends the run with a traceback, or a message that does not name it.
def test_a_missing_shard_is_one_line_naming_it(data, tmp_path):
  missing = data["train"].replace("000002}", "000003}")
  status, _, err = _main("--workdir", tmp_path, f"--config.dataset=wds:{missing}", f"--config.data_dir={tmp_path}")
  lines = err.strip().splitlines()
  assert status == 2 and len(lines) == 1 and "000003.tar cannot be opened" in lines[0], err


# Bug: latent diffusion cannot read wds: shards, keeps the undecodable sample (a black image) or loses captions.
def test_latent_diffusion_reads_shards(data):
  config = ml_collections.ConfigDict(ld_config.get_config().to_dict())
  config.dataset, config.data_dir = f"wds:{data['train']}", data["data_dir"]
  config.image_size, config.channels = 16, 3
  images = load_image_set(config)
  assert images.images.shape[1:] == (16, 16, 3) and images.images.dtype == np.uint8
  assert len(images.images) + len(images.test_images) == 32  # 33 samples, one undecodable; every tenth held out
  assert images.images.reshape(len(images.images), -1).max(axis=1).min() > 0  # no black placeholder
  assert "a red square" in images.captions and "a photo of something blue" in images.captions
  assert set(images.labels.tolist()) == {-1} and images.class_names is None
