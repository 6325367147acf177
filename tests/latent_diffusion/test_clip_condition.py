"""Latent diffusion conditioned on a trained CLIP run's text tower: the locked token features
restored from a CLIP workdir (on 8 devices) against the CLIP model's own text embeddings, the
one-line errors, and a pulse through the command line on the session's CLIP run (tests/runs.py, 8
devices): LD's stage 2 with condition=clip on the autoencoder of the session's LD run (a subprocess on
one CPU device, tests/one_device.py), then sampling from
the LD workdir alone (in-process, 8 devices)."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from multimodal_jax import sharding as shd
from multimodal_jax.checkpoint import read_config
from multimodal_jax.clip import build as clip_build
from multimodal_jax.clip import config as clip_config
from multimodal_jax.clip import model as clip_model
from multimodal_jax.clip import settings as clip_settings
from multimodal_jax.clip.features import ClipTokenFeatures, describe_run
from multimodal_jax.errors import UserError
from multimodal_jax.eval import from_checkpoint
from multimodal_jax.eval.images import decode_png
from multimodal_jax.latent_diffusion import config as ld_config
from multimodal_jax.latent_diffusion import prompts as ldp
from multimodal_jax.latent_diffusion import run as ld
from tests.one_device import run_mains

LD_TINY = [
    "--config.autoencoder.steps=2", "--config.autoencoder.batch_size=16", "--config.autoencoder.checkpoint_every=2",
    "--config.denoiser.steps=2", "--config.denoiser.batch_size=16", "--config.denoiser.checkpoint_every=2",
    "--config.autoencoder.log_every=1", "--config.denoiser.log_every=1", "--config.final_eval=false",
    "--config.train_images=256", "--config.dit=tiny", "--config.condition=clip",
]  # fmt: skip
FAST_SAMPLING = ["--config.sample_steps=2", "--config.eval_batch_size=16"]


def _main(module, capsys, workdir, data_dir, *args):
  status = module.main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", *args])
  out = capsys.readouterr()
  return status, out.out, out.err.strip().splitlines()


@pytest.fixture(scope="module")
def clip_dir(trained_runs):
  """This module's copy of the session's CLIP run: the default tiny model trained for 2 steps on 8 devices."""
  return trained_runs("clip")


@pytest.mark.slow
def test_clip_features_are_the_runs_own_text_tower(clip_dir):
  mesh = shd.make_mesh("data:-1")
  config = ld_config.get_config()
  config.condition, config.clip_workdir, config.context_length = "clip", str(clip_dir), 99  # the CLIP run's wins
  prompts = ldp.make_prompts(config, mesh)
  features = prompts.clip
  assert isinstance(features, ClipTokenFeatures) and prompts.context_dim == 128 and prompts.encoder_kind == "features"
  assert prompts.check("a handwritten seven.") == 7
  with pytest.raises(UserError, match="words the CLIP run's text tower never saw in training \\(fancy\\)"):
    prompts.check("a fancy seven")
  with pytest.raises(UserError, match="is 20 tokens but the context holds 16"):
    prompts.check("a photo of the number seven " * 3)
  assert features.step == 2 and features.width == 128 and features.context_length == 16
  ldp.check_clip_step({"clip_step": 2}, prompts, "DIR")  # the step a denoiser was trained on: fine
  with pytest.raises(UserError, match="features of CLIP step 1 but .* is now at step 2: retrain the denoiser"):
    ldp.check_clip_step({"clip_step": 1, "clip_workdir": str(clip_dir)}, prompts, "DIR")
  texts = ["a handwritten digit seven", "the number two", "a handwritten digit seven"]
  seq, mask = features(texts)
  assert seq.shape == (3, 16, 128) and seq.dtype == np.float32 and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(axis=1), [features.token_count(t) for t in texts])
  np.testing.assert_array_equal(seq[0], seq[2])
  # Different prompts, different features; causal: equal at the shared start token only.
  np.testing.assert_allclose(seq[0, 0], seq[1, 0], rtol=1e-5, atol=1e-6)
  assert np.abs(seq[0, 1] - seq[1, 1]).max() > 1e-2
  # The CLIP run's params restored on their own, through the CLIP experiment's eval path: its text
  # embeddings are these features at the end token, projected.
  config = from_checkpoint.saved_config(str(clip_dir), clip_config.get_config(), clip_config.EVAL_KEYS)
  settings = clip_settings.resolve(config)
  model = clip_model.CLIP(settings.model)
  tokenizer = settings.text_tokenizer()
  init = clip_build.make_init_params(model, settings, tokenizer.encode)
  _, params = from_checkpoint.restore_params(str(clip_dir), init, mesh, ema=False)
  own = model.apply({"params": params}, jnp.asarray(tokenizer.encode(texts[:2])), False, method=model.encode_text)
  eot = mask.sum(axis=1)[:2] - 1
  kernel = np.asarray(params["text_projection"]["kernel"])
  np.testing.assert_allclose(seq[[0, 1], eot] @ kernel, own, rtol=1e-4, atol=1e-5)
  # CLIP BPE's "!" is id 0, like pad: the mask runs to the end token (2), not over the non-pad ids.
  tokens = jnp.array([[1, 0, 9, 2] + [0] * 12, [1, 7, 8, 5, 2] + [0] * 11], jnp.int32)
  seq, mask = model.apply({"params": params}, tokens, method=model.encode_text_tokens)
  np.testing.assert_array_equal(mask, np.arange(16) <= np.array([[3], [4]]))
  own = model.apply({"params": params}, tokens, False, method=model.encode_text)
  np.testing.assert_allclose(np.asarray(seq)[[0, 1], [3, 4]] @ kernel, own, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_missing_or_wrong_clip_workdir_is_one_line(clip_dir, captioned_dir, tmp_path, capsys):
  for clip_workdir, message in [
      ("", "no CLIP checkpoint in ''"), (tmp_path / "nothing", "no CLIP checkpoint"),
  ]:  # fmt: skip
    status, _, err = _main(
      ld, capsys, tmp_path / "ld", captioned_dir, *LD_TINY, f"--config.clip_workdir={clip_workdir}"
    )
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert "python -m experiments.clip --workdir" in err[0]
    assert not os.path.exists(tmp_path / "ld") and not os.path.exists(tmp_path / "nothing")
  config = ld_config.get_config()
  config.condition, config.clip_workdir = "clip", str(clip_dir)
  saved = read_config(str(clip_dir))
  with pytest.raises(UserError, match="another experiment, not a CLIP run"):
    describe_run(config)  # the LD config itself has no image_tower
  with pytest.raises(UserError, match="text_tower=minilm, which has no token features"):
    describe_run(ml_collections.ConfigDict({**saved, "text_tower": "minilm"}))


@pytest.mark.slow
def test_pulse_trains_on_clip_features_and_samples_from_the_workdir_alone(
  clip_dir, captioned_dir, trained_runs, capsys, monkeypatch
):  # fmt: skip
  # Stage 2 alone (stage 1 takes no condition; its own tests train it), on the autoencoder of the session's LD run
  # (tests/runs.py, whose latents of its 256 training images are cached). A relative clip_workdir is recorded as an
  # absolute path.
  workdir = trained_runs("latent_diffusion")
  shutil.rmtree(workdir / "denoiser")
  args = ["--workdir", workdir, f"--config.data_dir={captioned_dir}", *LD_TINY, "--config.stage=denoiser"]
  ((status, _, err),) = run_mains(
    "latent_diffusion", [*args, f"--config.clip_workdir={clip_dir.name}"], cwd=clip_dir.parent
  )
  assert status == 0, err[-3000:]
  with open(workdir / "denoiser" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  config = read_config(str(workdir / "denoiser"))
  assert config["clip_workdir"] == str(clip_dir) and config["clip_step"] == 2 and config["condition"] == "clip"
  monkeypatch.chdir(workdir)
  prompts = "--config.prompt=a handwritten digit seven; the number two"
  status, _, err = _main(
    ld, capsys, workdir, captioned_dir, "--mode=sample", prompts, "--config.num_samples=2", *FAST_SAMPLING
  )
  assert status == 0, err
  assert decode_png((workdir / "samples.png").read_bytes()).shape == (2 * 34 + 2, 2 * 34 + 2)
