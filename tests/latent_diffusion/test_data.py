"""Latent diffusion on a user's images and on a pretrained autoencoder: a class-folder dataset of PNGs
made in the test (captions from class names, held-out images, sizes and channels), the CLI through
train / sample / eval on it, `autoencoder_from=diffusers_vae:DIR` and `--mode=export` as a round trip,
and the one-line errors of bad VAE sources."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError
from multimodal_jax.eval.images import decode_png
from multimodal_jax.latent_diffusion import autoencoder_kl as akl
from multimodal_jax.latent_diffusion import config as ld_config
from multimodal_jax.latent_diffusion import data as ldd
from multimodal_jax.latent_diffusion import pipeline as ldm
from multimodal_jax.latent_diffusion import run as ld_run
from multimodal_jax.latent_diffusion import stages as ldr
from multimodal_jax.latent_diffusion.diffusers_vae import diffusers_config, load_diffusers_vae, save_diffusers_vae
from multimodal_jax.latent_diffusion.generate import Generator
from tests.one_device import run_mains

TINY = [
    "--config.autoencoder.steps=2", "--config.autoencoder.batch_size=16", "--config.autoencoder.checkpoint_every=2",
    "--config.denoiser.steps=2", "--config.denoiser.batch_size=16", "--config.denoiser.checkpoint_every=2",
    "--config.text_layers=1", "--config.final_eval=false",
]  # fmt: skip
FAST = ["--config.sample_steps=2", "--config.eval_batch_size=16", "--config.classifier_steps=3"]
CLASSES = ("bright square", "dark ring")


def _shape_image(kind: int, size: int, rng) -> np.ndarray:
  yy, xx = np.mgrid[:size, :size] / size - 0.5
  if kind == 0:
    mask = (np.abs(yy) < 0.3) & (np.abs(xx) < 0.3)
  else:
    mask = np.abs(np.hypot(yy, xx) - 0.3) < 0.08
  colour = rng.integers(100, 256, 3)
  return (mask[..., None] * colour + rng.integers(0, 30, (size, size, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Class folders of 20 RGB PNGs each (sizes 40 and 48 px, so resizing is exercised)."""
  root = tmp_path_factory.mktemp("shapes")
  rng = np.random.default_rng(0)
  for label, name in enumerate(CLASSES):
    os.makedirs(root / name)
    for i in range(20):
      Image.fromarray(_shape_image(label, 40 + 8 * (i % 2), rng)).save(root / name / f"{i:03d}.png")
  return root


def _main(capsys, workdir, data_dir, *args):
  status = ld_run.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out = capsys.readouterr()
  return status, out.out, out.err.strip().splitlines()


def _config(**overrides):
  config = ld_config.get_config()
  config.update(overrides)
  return config


def test_folder_images_get_class_prompts_and_a_held_out_split(folder, tmp_path):
  data = ldd.load_image_set(_config(dataset=f"folder:{folder}", image_size=32, channels=3, data_dir=str(tmp_path)))
  assert data.class_names == CLASSES and data.images.shape == (36, 32, 32, 3) and data.images.dtype == np.uint8
  assert data.test_images.shape == (4, 32, 32, 3)  # every tenth record is held out
  assert np.array_equal(np.bincount(data.labels), [18, 18]) and np.array_equal(data.test_labels, [0, 0, 1, 1])
  assert data.captions[0] == "a photo of a bright square" and len(data.captions) == len(data.index) == 36
  assert [data.labels[i] for i in data.index] == [CLASSES.index(c[len("a photo of a ") :]) for c in data.captions]
  assert data.label_of("A Dark  Ring, please") == 1 and data.label_of("a cat") == -1
  texts, labels = data.eval_prompts(2)
  assert texts == ["a photo of a bright square"] * 2 + ["a photo of a dark ring"] * 2 and list(labels) == [0, 0, 1, 1]
  templates = tmp_path / "templates.txt"
  templates.write_text("a drawing of a {}\n# skipped\nthe {}, seen closely\n")
  two = ldd.load_image_set(_config(dataset=f"folder:{folder}", templates=str(templates), data_dir=str(tmp_path)))
  assert len(two.captions) == 72 and two.captions[:2] == [
    "a drawing of a bright square",
    "the bright square, seen closely",
  ]
  assert two.images.shape == (36, 32, 32, 1)  # channels=1 by default
  limited = two.limited(5)
  assert len(limited.images) == 5 and len(limited.captions) == 10 and limited.index.max() == 4


def test_the_embedded_digits_are_decoded_once_a_build(monkeypatch):
  # catches a cache that outlives a rebuild (the old images after the data changed), shared arrays a caller can
  # write into, and shared caption lists that one caller's edit changes for the next; and no cache at all
  rng = np.random.default_rng(0)

  def split(n):
    return [
      {"image": rng.integers(0, 256, (32, 32, 1), np.uint8), "caption": f"c{i}", "label": i % 10} for i in range(n)
    ]

  records = {"train": split(12), "test": split(4)}
  signature = [("digits.array_record", 10, 1)]
  decoded = []
  monkeypatch.setattr(ldd.cd, "load", lambda data_dir: records)
  monkeypatch.setattr(ldd.cd, "prepared_signature", lambda data_dir: tuple(signature))
  monkeypatch.setattr(ldd, "split_arrays", lambda source: decoded.append(len(source)) or ldm.split_arrays(source))
  monkeypatch.setattr(ldd, "_DECODED_DIGITS", {})
  first, second = ldd._digits("d"), ldd._digits("d")
  assert decoded == [12, 4]  # the second call decodes nothing
  assert second.images is first.images and np.array_equal(
    second.test_images, np.stack([r["image"] for r in records["test"]])
  )
  with pytest.raises(ValueError, match="read-only"):
    second.images[0, 0, 0, 0] = 1
  first.captions.append("mine")
  assert second.captions == [f"c{i}" for i in range(12)]
  signature[0] = ("digits.array_record", 10, 2)  # rebuilt: same name and size, a new modification time
  records["train"] = split(12)
  third = ldd._digits("d")
  assert decoded == [12, 4, 12, 4] and np.array_equal(third.images[0], records["train"][0]["image"])


@pytest.mark.slow
def test_the_signature_of_the_prepared_digits_names_their_files(captioned_dir):
  # catches a signature of nothing (every build would look the same) or one that changes between two reads of
  # the same build (nothing would be kept)
  signature = ldd.cd.prepared_signature(captioned_dir)
  assert sum(".array_record" in path for path, _, _ in signature) >= 2  # a train and a test file at least
  assert ldd.cd.prepared_signature(captioned_dir) == signature
  config = _config(data_dir=captioned_dir)
  assert ldd.load_image_set(config).images is ldd.load_image_set(config).images


def test_autoencoder_preset_follows_the_image_size():
  for size, side in ((32, 8), (64, 8)):
    config = _config(image_size=size, channels=3)
    model = ldr.autoencoder_model(config)
    assert model.config.in_channels == model.config.out_channels == 3
    assert ldr.latent_side(config, model) == side
  assert ldr.autoencoder_model(_config()).config == akl.PRESETS["digits"]  # the default run's model
  with pytest.raises(UserError, match="choose an image_size divisible by 16"):
    ldr.latent_side(_config(image_size=40), ldr.autoencoder_model(_config(image_size=40)))
  with pytest.raises(UserError, match="captioned_digits images are 32x32 grey"):
    ldd.load_image_set(_config(image_size=64))


@pytest.mark.slow
def test_cli_trains_samples_and_evaluates_on_a_folder(folder, tmp_path):
  # on one device (tests/one_device.py): this is about the folder's data, prompts and images, not the mesh
  common = ["--workdir", tmp_path / "run", f"--config.data_dir={tmp_path}"]
  data = ["--config.dataset=folder:" + str(folder), "--config.channels=3", "--config.image_size=32"]
  sample = ["--mode=sample", "--config.prompt=a dark ring; a bright square", "--config.num_samples=2", *FAST]
  evaluate = ["--mode=eval", "--config.eval_samples_per_digit=2", "--config.eval_test_images=4", *FAST]
  done = run_mains("latent_diffusion", [*common, *TINY, *data], [*common, *sample], [*common, *evaluate])
  assert [status for status, _, _ in done] == [0, 0, 0], done[-1][2][-3000:]
  workdir = tmp_path / "run"
  assert decode_png((workdir / "samples.png").read_bytes()).shape == (2 * 34 + 2, 2 * 34 + 2, 3)
  assert sorted(os.listdir(workdir / "samples")) == ["0000.png", "0001.png", "0002.png", "0003.png"]
  assert decode_png((workdir / "samples" / "0003.png").read_bytes()).shape == (32, 32, 3)
  result = json.loads(done[2][1].strip().splitlines()[-1])
  assert result["num_generated"] == 4 and len(result["accuracy_per_class"]) == 2
  assert 0.0 <= result["conditional_accuracy"] <= 1.0 and result["fid"] >= 0.0
  assert f"labels of folder:{folder}" in result["fid_features"]


def _tree_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.slow
def test_pretrained_vae_replaces_stage_one_and_export_round_trips(tmp_path, capsys, captioned_dir, trained_runs):
  data_dir = captioned_dir
  digits = ["--config.train_images=64", *TINY]
  # Stage 1 of our own (the session's run, tests/runs.py), exported as a diffusers folder with its measured scale.
  own = trained_runs("latent_diffusion")
  vae = tmp_path / "vae"
  status, _, err = _main(capsys, own, data_dir, "--mode=export", f"--config.export_to=diffusers_vae:{vae}")
  assert status == 0, err
  measured = json.loads((own / "autoencoder" / "latent_scale.json").read_text())["scale_factor"]
  vae_config, vae_params = load_diffusers_vae(vae)
  assert vae_config.scaling_factor == pytest.approx(measured) and vae_config.shift_factor is None
  mesh = shd.make_mesh("data:-1")
  _, own_params, _ = ldr.restore_autoencoder(str(own), mesh)
  assert _tree_equal(vae_params, jax.device_get(own_params))
  # With a shift factor, as newer VAEs have: the denoiser trains on it, stage 1 never runs.
  save_diffusers_vae(vae, vae_params, akl.AutoencoderKLConfig(**{**vae_config.__dict__, "shift_factor": 0.25}))
  run = tmp_path / "run"
  status, _, err = _main(capsys, run, data_dir, *digits, f"--config.autoencoder_from=diffusers_vae:{vae}")
  assert status == 0, err
  assert not os.path.exists(run / "autoencoder" / "metrics.jsonl")
  generator = Generator(_config(data_dir=data_dir), str(run))
  assert generator.config.scale_factor == pytest.approx(measured) and generator.config.shift_factor == 0.25
  assert generator.sampler.shift_factor == 0.25 and _tree_equal(jax.device_get(generator.ae_params), vae_params)
  status, _, err = _main(capsys, run, data_dir, "--mode=sample", "--config.num_samples=2", *FAST)
  assert status == 0, err
  again = tmp_path / "again"
  status, _, err = _main(capsys, run, data_dir, "--mode=export", f"--config.export_to=diffusers_vae:{again}")
  assert status == 0, err
  again_config, again_params = load_diffusers_vae(again)
  assert again_config.shift_factor == 0.25 and _tree_equal(again_params, vae_params)


def test_bad_vae_folders_are_one_line_before_any_data_loads(tmp_path, capsys):
  """A missing folder, one without config.json, one without weights, a VAE of the wrong channels and one whose
  downsampling does not divide the image size: one line each, checked from config.json alone before the data
  is built or anything is written. Catches a check moved back behind the data (the data dir would fill)."""
  data_dir, workdir = tmp_path / "tfds", tmp_path / "w"
  empty, no_weights, rgb, coarse = (tmp_path / n for n in ("empty", "no_weights", "rgb", "coarse"))
  for folder, config in (
    (no_weights, akl.PRESETS["small_f8"]),
    (rgb, akl.PRESETS["small_f8"]),  # 3 channels; the digits have 1
    (coarse, dataclasses.replace(akl.PRESETS["small_f8"], in_channels=1, out_channels=1, block_out_channels=(8,) * 7)),
  ):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config(config)))
    if folder != no_weights:
      (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read by these checks
  empty.mkdir()
  for source, message in (
    (tmp_path / "missing", "no diffusers model folder"),
    (empty, "has no config.json"),
    (no_weights, "the folder holds no AutoencoderKL weights"),
    (rgb, "set --config.channels=3"),
    (coarse, "image_size"),
  ):
    status, _, err = _main(capsys, workdir, data_dir, *TINY, f"--config.autoencoder_from=diffusers_vae:{source}")
    assert status == 2 and len(err) == 1 and message in err[0], (source, err)
    assert not data_dir.exists() and not workdir.exists(), source


@pytest.mark.slow
def test_vae_weights_that_do_not_fit_their_config_are_one_line(tmp_path, capsys, captioned_dir):
  wrong = tmp_path / "wrong"  # a grey VAE's weights under a config.json with other widths
  model = akl.AutoencoderKL(dataclasses.replace(akl.PRESETS["small_f8"], in_channels=1, out_channels=1))
  params = nn.meta.unbox(jax.jit(ldr.autoencoder_init(model))(jax.random.key(0)))
  save_diffusers_vae(wrong, jax.device_get(params), model.config)
  config = json.loads((wrong / "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 32, 64, 128]}))
  capsys.readouterr()  # the session data's build output is not part of the error
  status, _, err = _main(
    capsys, tmp_path / "w", captioned_dir, *TINY, f"--config.autoencoder_from=diffusers_vae:{wrong}"
  )
  assert status == 2 and len(err) == 1 and "does not fit the parameter" in err[0], err
  assert not os.path.exists(tmp_path / "w" / "denoiser")
