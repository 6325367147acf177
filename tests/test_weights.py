"""Weights in: frozen parameters, the weight-decay mask, init_from another run or a converter."""

import jax
import numpy as np
import pytest

from multimodal_jax import checkpoint, loop, train
from multimodal_jax import sharding as shd
from multimodal_jax.errors import UserError
from tests import toy


def _fit(workdir, mesh="data:4,fsdp:2", converters=None, **overrides):
  config = loop.base_config(steps=6, batch_size=32, seed=3, log_every=2, checkpoint_every=3)
  config.learning_rate, config.warmup_steps, config.weight_decay = 1e-2, 0, 0.1
  config.update(overrides)
  return toy.fit(workdir, config, mesh, tx=train.make_optimizer(config), converters=converters)


def _initial(seed=3):
  return jax.tree.map(np.asarray, jax.tree.map(lambda b: b.value, toy.init_params(jax.random.key(seed)),
                                               is_leaf=lambda x: hasattr(x, "names")))  # fmt: skip


def test_frozen_params_are_bit_identical_and_have_no_moments(tmp_path):
  result = _fit(tmp_path, freeze="^hidden_0/")
  params, start = toy.params_of(result.state), _initial()
  np.testing.assert_array_equal(params["hidden_0"]["kernel"], start["hidden_0"]["kernel"])
  np.testing.assert_array_equal(params["hidden_0"]["bias"], start["hidden_0"]["bias"])
  assert np.abs(params["out"]["kernel"] - start["out"]["kernel"]).max() > 1e-3
  moments = [
    jax.tree_util.keystr(path)
    for path, leaf in jax.tree_util.tree_leaves_with_path(result.state.opt_state)
    if getattr(leaf, "ndim", 0) >= 1
  ]
  assert moments and all("hidden_0" not in m for m in moments) and any("out" in m for m in moments), moments


def test_weight_decay_mask_spares_biases_scales_and_position_tables():
  paths = [
    "vision/conv1/kernel", "text/token_embedding", "text/positional_embedding", "vision/class_embedding",
    "blocks/ln_1/scale", "blocks/attn/qkv/bias", "logit_scale", "logit_bias", "position_embedding",
    "dit/null_token", "bert/word_embeddings",
  ]  # fmt: skip
  assert [p for p in paths if train.decays(p)] == [
    "vision/conv1/kernel",
    "text/token_embedding",
    "bert/word_embeddings",
  ]


@pytest.mark.parametrize("mask,bias_moved_by_decay", [("default", False), ("all", True)])
def test_weight_decay_mask_in_the_optimizer(mask, bias_moved_by_decay):
  config = loop.base_config(steps=10, learning_rate=0.1, warmup_steps=0, weight_decay=0.5, weight_decay_mask=mask)
  tx, _ = train.make_optimizer(config)
  params = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradients: only the decay moves a param
  assert np.abs(updates["dense"]["kernel"]).max() > 0
  assert (np.abs(updates["dense"]["bias"]).max() > 0) == bias_moved_by_decay


@pytest.mark.slow
def test_init_from_another_run_starts_at_step_zero_with_its_params(tmp_path):
  source = _fit(tmp_path / "source")  # checkpoints at steps 3 and 6
  mesh = shd.make_mesh("data:4,fsdp:2")
  _, at3, _ = checkpoint.restore_params(str(tmp_path / "source"), train.abstract_params(toy.init_params, mesh), step=3)
  # learning rate 0: one step changes nothing, so the new run's params are the ones it started from.
  result = _fit(
    tmp_path / "new", init_from=f"workdir:{tmp_path / 'source'}@3", steps=1, learning_rate=0.0, ema_decay=0.5
  )  # with an EMA too: its buffers are separate from the params' (the step donates both)
  counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(result.state.opt_state) if "count" in str(p)]
  assert result.start_step == 0 and counts and set(counts) == {1}  # a fresh optimizer, one update
  new, want = toy.params_of(result.state), jax.tree.map(np.asarray, at3)
  ema = jax.tree.map(np.asarray, jax.device_get(result.state.ema_params))
  for name in ("hidden_0", "out"):
    np.testing.assert_array_equal(new[name]["kernel"], want[name]["kernel"])
    np.testing.assert_array_equal(ema[name]["kernel"], want[name]["kernel"])
  assert not np.array_equal(want["out"]["kernel"], toy.params_of(source.state)["out"]["kernel"])  # not step 6


@pytest.mark.slow
def test_init_from_a_converter_is_sharded_and_checked(tmp_path):
  start = jax.tree.map(lambda x: x + 1.0, _initial())
  calls = []

  def convert(path, abstract):
    calls.append(path)
    return start

  result = _fit(tmp_path / "ok", converters={"mine": convert}, init_from="mine:weights.bin", steps=1)
  assert calls == ["weights.bin"]
  kernel = result.state.params["hidden_0"]["kernel"]
  assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # FSDP-sharded, as the rules table says
  wrong = {**start, "out": {**start["out"], "kernel": np.zeros((5, 4), np.float32)}}
  with pytest.raises(UserError, match=r"out\.kernel has shape \(5, 4\) there but \(32, 4\) here"):
    _fit(tmp_path / "bad", converters={"mine": lambda p, a: wrong}, init_from="mine:w")
  with pytest.raises(UserError, match="unknown source kind 'hub'"):
    _fit(tmp_path / "bad2", converters={"mine": convert}, init_from="hub:x")
  with pytest.raises(UserError, match="no checkpoint"):
    _fit(tmp_path / "bad3", init_from=f"workdir:{tmp_path / 'nothing'}")


def test_resuming_with_another_optimizer_layout_is_one_line_and_moves_nothing(tmp_path):
  from multimodal_jax.checkpoint import CheckpointMismatchError, saved_steps

  _fit(tmp_path, freeze="^hidden_0/", steps=3)
  with pytest.raises(CheckpointMismatchError, match="another optimizer state .*init_from=workdir:"):
    _fit(tmp_path, steps=6)  # the same run resumed without the freeze: AdamW would need moments it never had
  assert saved_steps(str(tmp_path)) == [3] and not (tmp_path / "checkpoints_unreadable").exists()
