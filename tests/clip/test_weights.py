"""CLIP weights through the experiment's command line: evaluating imported open_clip weights with
no training step, init_from + freeze (LiT), export, and bad sources as one line each.

The open_clip files are random-initialised CLIPs of ours written by `save_open_clip` (exactly the
files open_clip writes for that architecture); the comparison with open_clip itself needs the
parity extra (torch + open_clip_torch) and skips without it."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from multimodal_jax import train
from multimodal_jax.clip import config as clip_config
from multimodal_jax.clip import model as clip_model
from multimodal_jax.clip import open_clip as oc
from multimodal_jax.clip import run as clip_run_mod
from multimodal_jax.clip import weights as clip_weights
from multimodal_jax.data import image_files
from multimodal_jax.errors import UserError
from multimodal_jax.text import ClipBPETokenizer
from tests import runs

CLASSES = ("blue bar", "green circle", "red square")  # sorted, as the folder's classes are


def _tiny_bpe(**changes) -> clip_model.ClipConfig:
  base = clip_model.PRESETS["tiny"]
  text = clip_model.TextConfig(vocab_size=49408, context_length=77, width=64, layers=2, heads=2)
  vision = clip_model.VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, channels=3)
  return clip_model.ClipConfig(**{"embed_dim": 32, "vision": vision, "text": text, "scan": base.scan, **changes})


def _save_random(path, cfg, seed=0):
  model = clip_model.CLIP(cfg)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32))
  params = jax.tree.map(np.asarray, nn_unbox(variables["params"]))
  oc.save_open_clip(str(path), params, cfg)
  return params


def nn_unbox(tree):
  from flax import linen as nn

  return nn.meta.unbox(tree)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  rng = np.random.default_rng(0)
  colours = [(40, 60, 230), (30, 200, 40), (220, 30, 30)]
  for c, name in enumerate(CLASSES):
    os.makedirs(root / name)
    for i in range(4):
      pixels = rng.integers(0, 60, (40 + 4 * i, 36, 3), dtype=np.uint8)
      pixels[8:30, 8:28] = colours[c]
      mode = ["RGB", "L", "RGBA", "P"][i]
      Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
  return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "random_clip.safetensors"
  cfg = _tiny_bpe()
  return path, cfg, _save_random(path, cfg)


def _templates(tmp_path):
  path = tmp_path / "templates.txt"
  path.write_text("a photo of a {}.\n# comment\n\nan image showing a {}\n")
  return str(path)


def _our_predictions(params, cfg, folder, templates):
  """The imported model's zero-shot predictions computed directly: open_clip's preprocessing
  (Pillow, bicubic shorter side + centre crop, OpenAI mean/std), CLIP's BPE, context 77."""
  model = clip_model.CLIP(cfg)
  tok = ClipBPETokenizer(context_length=77)
  paths = [str(folder / n / f) for n in sorted(os.listdir(folder)) for f in sorted(os.listdir(folder / n))]
  mean, std = image_files.normalization("openai", "openai", 3)
  images = np.stack([image_files.load_image(p, 32, 3) for p in paths])
  img = model.apply({"params": params}, image_files.normalize(images, mean, std), method=model.encode_image)
  prompts = [t.format(c) for c in CLASSES for t in templates]
  txt = np.array(model.apply({"params": params}, tok.encode(prompts), method=model.encode_text))
  txt = txt.reshape(len(CLASSES), len(templates), -1)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  cls = txt.mean(1)
  cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
  return paths, (np.asarray(img) @ cls.T).argmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["", "init_from"])
def test_eval_of_imported_weights_needs_no_training(tmp_path, folder, weights, model, capsys):
  path, cfg, params = weights
  workdir = tmp_path / "new_run"  # does not exist yet
  args = ["--workdir", str(workdir), "--mode=eval", f"--config.init_from=open_clip:{path}"]
  args += [f"--config.eval_dataset=folder:{folder}", f"--config.templates={_templates(tmp_path)}"]
  args += [f"--config.data_dir={tmp_path / 'data'}", "--config.eval_batch_size=8"]
  if model:  # empty: the architecture of the weights too (the default with init_from=open_clip)
    args.append(f"--config.model={model}")
  assert clip_run_mod.main(args) == 0, capsys.readouterr().err
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step"] == 0 and result["num_images"] == 12.0 and result["init_from"] == f"open_clip:{path}"
  assert not os.path.exists(workdir / "checkpoints")
  rows = [json.loads(line) for line in (workdir / "predictions.jsonl").read_text().splitlines()]
  paths, expected = _our_predictions(params, cfg, folder, ["a photo of a {}.", "an image showing a {}"])
  assert [r["index"] for r in rows] == list(range(12))
  assert [r["path"] for r in rows] == paths
  assert [r["label"] for r in rows] == [i // 4 for i in range(12)]
  assert [r["prediction"] for r in rows] == expected.tolist()
  assert all(0 < r["probability"] <= 1 for r in rows)
  assert result["zero_shot_accuracy"] == pytest.approx(np.mean(expected == np.arange(12) // 4))


def _eval_error(tmp_path, folder, source, *extra):
  args = ["--workdir", str(tmp_path / "w"), "--mode=eval", f"--config.init_from={source}"]
  args += [
    f"--config.eval_dataset=folder:{folder}",
    f"--config.data_dir={tmp_path / 'data'}",
    "--config.eval_batch_size=8",
  ]
  return clip_run_mod.main([*args, *extra])


@pytest.mark.slow
def test_bad_sources_are_one_line(tmp_path, folder, weights, capsys):
  path = weights[0]
  cases = []
  assert _eval_error(tmp_path, folder, f"open_clip:{tmp_path / 'missing.safetensors'}") == 2
  cases.append(("no such file", capsys.readouterr().err))
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[:5000])
  assert _eval_error(tmp_path, folder, f"open_clip:{truncated}", "--config.model=init_from") == 2
  cases.append(("cannot be used", capsys.readouterr().err))
  from safetensors.numpy import save_file

  resnet = tmp_path / "rn50.safetensors"
  save_file({"visual.layer1.0.conv1.weight": np.zeros((4, 4, 1, 1), np.float32)}, str(resnet))
  assert _eval_error(tmp_path, folder, f"open_clip:{resnet}", "--config.model=init_from") == 2
  cases.append(("ModifiedResNet", capsys.readouterr().err))
  assert _eval_error(tmp_path, folder, f"open_clip:{path}", "--config.model=tiny") == 2  # another architecture
  cases.append(("does not fit --config.model=tiny", capsys.readouterr().err))
  assert _eval_error(tmp_path, folder, f"open_clip:{path}", "--config.model=init_from", "--config.image_size=64") == 2
  cases.append(("vision.image_size is 32 in the file but 64 here; set --config.image_size", capsys.readouterr().err))
  quick = tmp_path / "quick.safetensors"
  _save_random(quick, _tiny_bpe(activation="quick_gelu"))
  args = ("--config.model=init_from", "--config.activation=gelu")
  assert _eval_error(tmp_path, folder, f"open_clip:{quick}", *args) == 2
  cases.append(("activation is quick_gelu in the file but gelu here", capsys.readouterr().err))
  for needle, err in cases:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (needle, err)


def test_check_fits_names_the_first_difference():
  cfg = _tiny_bpe()
  clip_weights.check_fits(cfg, cfg, "open_clip:f", "init_from")
  with pytest.raises(Exception, match="text.context_length is 77 in the file but 16 here"):
    other = _tiny_bpe(text=clip_model.TextConfig(vocab_size=49408, context_length=16, width=64, layers=2, heads=2))
    clip_weights.check_fits(cfg, other, "open_clip:f", "init_from")
  with pytest.raises(Exception, match="vision.layers is 2 in the file but 3 here"):
    vision = clip_model.VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=2, channels=3)
    clip_weights.check_fits(cfg, _tiny_bpe(vision=vision), "open_clip:f", "init_from")


def _train(data_dir, workdir, *extra):
  """A run of the session's CLIP run's settings (tests/runs.py) with `extra` settings."""
  args = ["--workdir", str(workdir), f"--config.data_dir={data_dir}", *runs.TRAIN_ARGS["clip"]]
  return clip_run_mod.main([*args, *extra])


@pytest.mark.slow
def test_lit_from_open_clip_weights_then_export_round_trip(tmp_path, weights, captioned_dir, capsys):
  path, cfg, params = weights
  workdir = tmp_path / "lit"
  init = [f"--config.init_from=open_clip:{path}", "--config.freeze=image"]
  assert _train(captioned_dir, workdir, *init, "--config.channels=3") == 0, capsys.readouterr().err
  out = tmp_path / "exported" / "lit.safetensors"
  assert clip_run_mod.main(["--workdir", str(workdir), "--mode=export", f"--config.export_to=open_clip:{out}"]) == 0
  cfg_back, exported = oc.load_open_clip(str(out))
  assert os.path.isfile(str(out)[: -len(".safetensors")] + ".json")
  # frozen: the image tower and its projection are bit-identical to the file's, the text tower moved
  for key in ("visual", "image_projection"):
    jax.tree.map(np.testing.assert_array_equal, exported[key], params[key])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), exported["text"], params["text"]))
  assert any(moved)
  assert cfg_back.vision == cfg.vision and cfg_back.text == cfg.text


@pytest.mark.slow
def test_freeze_keeps_no_adam_moments_for_the_frozen_tower():
  config = clip_config.get_config()
  config.freeze = "image"
  tx, _ = train.make_optimizer(config, freeze_aliases=clip_weights.FREEZE_ALIASES)
  cfg = _tiny_bpe()
  init = jax.jit(clip_model.CLIP(cfg).init)  # jit: one compile, not one an op
  params = nn_unbox(init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32))["params"])
  state = tx.init(params)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  names = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p) for p, _ in leaves]
  moments = [n for n in names if "/mu/" in n or "/nu/" in n]
  assert moments and not [n for n in moments if "/visual/" in n or "/image_projection/" in n]
  assert [n for n in moments if "/text/" in n]
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  _, state = update(grads, state, params)  # step 0 of the warmup has learning rate 0
  updates, _ = update(grads, state, params)
  assert all(not np.any(u) for u in jax.tree.leaves(updates["visual"]))
  assert any(np.any(u) for u in jax.tree.leaves(updates["text"]))


@pytest.mark.slow
def test_export_of_a_run_open_clip_cannot_use_is_one_line(tmp_path, trained_runs, capsys):
  # catches --mode=export that writes a file for the session's default run (a ResNet tower and the words
  # tokenizer), or fails with a traceback or several lines instead of the refusal
  workdir = trained_runs("clip")
  capsys.readouterr()
  out = tmp_path / "x.safetensors"
  assert clip_run_mod.main(["--workdir", str(workdir), "--mode=export", f"--config.export_to=open_clip:{out}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "image tower is resnet" in err[0] and not out.exists()


def _exportable(vision=None, text=None, **top):
  """`_tiny_bpe()` (a model open_clip takes) with changes to its vision config, text config and top-level fields."""
  cfg = _tiny_bpe()
  vision, text = dataclasses.replace(cfg.vision, **(vision or {})), dataclasses.replace(cfg.text, **(text or {}))
  return dataclasses.replace(cfg, vision=vision, text=text, **top)


@pytest.mark.parametrize(
  "changes, tokenizer, file, needle",
  [
    ({"vision": {"tower": "resnet"}}, "clip_bpe", "x.safetensors", "image tower is resnet,"),
    ({"vision": {"pool": "mean"}}, "clip_bpe", "x.safetensors", "image tower is a ViT pooled by mean"),
    ({"text_tower": "precomputed"}, "clip_bpe", "x.safetensors", "text tower is precomputed"),
    ({}, "words", "x.safetensors", "tokenizer is words"),
    ({"text": {"vocab_size": 1000}}, "clip_bpe", "x.safetensors", "tokenizer is clip_bpe"),
    ({"vision": {"channels": 1}}, "clip_bpe", "x.safetensors", "3-channel images"),
    ({}, "clip_bpe", "x.pt", "expected open_clip:FILE.safetensors"),
  ],
)
def test_export_refuses_what_open_clip_cannot_use(tmp_path, changes, tokenizer, file, needle):
  # catches a refusal that is dropped (a file open_clip cannot load, or that gives other features, is written),
  # that names the wrong setting, or that comes after the file is written; the last row: a target that is not
  # open_clip:FILE.safetensors. No params are needed: every refusal comes before they are read.
  with pytest.raises(UserError, match=re.escape(needle)):
    clip_weights.export_open_clip(None, _exportable(**changes), tokenizer, f"open_clip:{tmp_path / file}")
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_open_clip_zero_shot_agrees(tmp_path, folder, weights):
  torch = pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
  open_clip = pytest.importorskip("open_clip", reason="the parity extra (open_clip_torch) is not installed")
  path, cfg, params = weights
  model_cfg = json.loads((path.parent / "random_clip.json").read_text())["model_cfg"]
  model = open_clip.CLIP(**model_cfg)
  from safetensors.torch import load_file

  model.load_state_dict(load_file(str(path)))
  model.eval()
  preprocess = open_clip.image_transform(32, is_train=False)
  tokenizer = open_clip.get_tokenizer("ViT-B-32")
  templates = ["a photo of a {}.", "an image showing a {}"]
  paths, ours = _our_predictions(params, cfg, folder, templates)
  with torch.no_grad():
    img = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
    txt = model.encode_text(tokenizer([t.format(c) for c in CLASSES for t in templates]), normalize=True)
    txt = txt.reshape(len(CLASSES), len(templates), -1).mean(1)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    theirs = (img @ txt.T).argmax(-1).numpy()
  np.testing.assert_array_equal(ours, theirs)
