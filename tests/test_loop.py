"""The loop: exact resume, corrupt-checkpoint fallback, the NaN guard, metrics without repeats."""

import json
import os

import chex
import numpy as np
import pytest

from multimodal_jax import checkpoint as ckpt
from multimodal_jax import loop
from multimodal_jax.data.pipeline import GrainBatches
from tests import toy


def _fit(workdir, steps, mesh="data:4,fsdp:2", source=None, checkpoint_every=4, **kw):
  config = loop.base_config(steps=steps, batch_size=32, seed=3, log_every=2, checkpoint_every=checkpoint_every, **kw)
  return toy.fit(workdir, config, mesh, source)


def _steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
  full = _fit(tmp_path / "full", steps=16, ema_decay=0.9)
  _fit(tmp_path / "resumed", steps=8, ema_decay=0.9)  # "interrupted" at N/2 (checkpoint at 8)
  resumed = _fit(tmp_path / "resumed", steps=16, ema_decay=0.9)
  assert resumed.start_step == 8
  chex.assert_trees_all_equal(toy.params_of(resumed.state), toy.params_of(full.state))
  chex.assert_trees_all_equal(
    np.asarray(resumed.state.ema_params["out"]["kernel"]), np.asarray(full.state.ema_params["out"]["kernel"])
  )
  assert _steps_logged(tmp_path / "resumed") == _steps_logged(tmp_path / "full")
  with open(tmp_path / "full" / "metrics.jsonl") as f:
    record = json.loads(f.readline())
  assert {"step", "loss", "examples_per_sec", "grad_norm", "learning_rate"} <= set(record)
  assert os.listdir(tmp_path / "full" / "tensorboard" / "metrics")


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_logs_no_step_twice(tmp_path):
  _fit(tmp_path, steps=10, checkpoint_every=4)  # checkpoints at 4, 8, 10
  # Simulate a crash after step 10's log but before its checkpoint: drop checkpoint 10.
  import shutil

  shutil.rmtree(tmp_path / "checkpoints" / "10")
  result = _fit(tmp_path, steps=12, checkpoint_every=4)
  assert result.start_step == 8
  steps = _steps_logged(tmp_path)
  assert len(steps) == len(set(steps)) and steps == sorted(steps) and steps[-1] == 12


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  _fit(tmp_path, steps=8, checkpoint_every=4)
  latest = tmp_path / "checkpoints" / "8" / "state"
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  result = _fit(tmp_path, steps=12, checkpoint_every=4)
  assert result.start_step == 4
  out = capsys.readouterr().out
  assert "the checkpoint at step 8 in" in out and "is unreadable" in out


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  _fit(tmp_path, steps=4, checkpoint_every=4)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for name in files:
      os.remove(os.path.join(root, name))
  with pytest.raises(ckpt.NoUsableCheckpointError, match="no readable checkpoint"):
    _fit(tmp_path, steps=8)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  # Poison one record of step 6's batch (one epoch is 16 batches, so it appears first there).
  clean = toy.ToySource()
  batches = GrainBatches(clean, 32, seed=3)
  for _ in range(5):
    next(batches)
  row = next(batches)["x"][0]
  record = int(np.flatnonzero((clean.x == row).all(-1))[0])
  source, bad_step = toy.ToySource(nan_record=record), 6
  with pytest.raises(loop.NonFiniteLossError, match=f"at step {bad_step};") as e:
    _fit(tmp_path, steps=100, source=source, checkpoint_every=4)
  last_good = 4 * ((bad_step - 1) // 4)
  assert f"last good checkpoint (step {last_good})" in str(e.value)
  assert ckpt.Checkpointer(str(tmp_path)).latest_step() == last_good


def test_data_stream_seek_matches_a_consumed_stream():
  a = GrainBatches(toy.ToySource(), 32, seed=1, process_index=1, process_count=2)
  for _ in range(20):  # past an epoch boundary (256 records per shard = 16 batches of 16)
    next(a)
  b = GrainBatches(toy.ToySource(), 32, seed=1, process_index=1, process_count=2)
  b.seek(20)
  np.testing.assert_array_equal(next(a)["x"], next(b)["x"])


def test_data_state_keeps_the_format_checkpoints_hold():
  """The saved stream position is grain's zero-worker DataLoader JSON (checkpoints of earlier releases
  hold it): a literal state restores at its batch, and the stream writes the same fields back."""
  saved = {"version": 2, "last_seen_indices": {"0": 18 * 16 * 2 + 1 - 2}, "last_worker_index": -1, "worker_count": 0}
  consumed = GrainBatches(toy.ToySource(), 32, seed=1, process_index=1, process_count=2)
  for _ in range(18):
    next(consumed)
  assert {k: v for k, v in json.loads(consumed.get_state()).items() if k in saved} == saved
  resumed = GrainBatches(toy.ToySource(), 32, seed=1, process_index=1, process_count=2)
  resumed.set_state(json.dumps({**saved, "sampler": "IndexSampler(...)", "data_source": "..."}).encode())
  np.testing.assert_array_equal(next(resumed)["x"], next(consumed)["x"])


def _double(record):
  return {"x": record["x"] * 2, "label": record["label"]}


@pytest.mark.slow  # ~45 s under load: grain worker processes each pay their imports
def test_worker_processes_give_the_same_stream_and_state():
  """grain worker processes build the same batches in the same order as the main process, and the
  saved state does not depend on their number: a stream resumes under another worker count."""
  source, kw = toy.ToySource(), {"seed": 1, "process_index": 1, "process_count": 2, "transform": _double}
  main, workers = GrainBatches(source, 32, **kw), GrainBatches(source, 32, workers=2, **kw)
  try:
    for _ in range(18):  # past an epoch boundary
      a, b = next(main), next(workers)
      np.testing.assert_array_equal(a["x"], b["x"])
      np.testing.assert_array_equal(a["label"], b["label"])
    assert main.get_state() == workers.get_state()
    resumed = GrainBatches(source, 32, workers=1, **kw)
    resumed.set_state(main.get_state())
    np.testing.assert_array_equal(next(resumed)["x"], next(main)["x"])
    resumed.close()
  finally:
    workers.close()


class _BatchableToySource(toy.ToySource):
  def batch(self, rows):
    return {"x": self.x[rows], "label": self.label[rows]}


def test_batch_fetching_stream_covers_the_data_and_seeks():
  source = _BatchableToySource()
  shards = [GrainBatches(source, 32, seed=1, process_index=i, process_count=2, fetch_batches=True) for i in (0, 1)]
  rows = []
  for _ in range(16):  # one epoch: 512 records = 16 steps of 2 x 16 rows
    for shard in shards:
      batch = next(shard)
      assert batch["x"].shape == (16, toy.DIM) and batch["label"].shape == (16,)
      rows.append(batch["x"])
  seen = np.concatenate(rows)
  np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(source.x, axis=0))  # every record once
  a = GrainBatches(source, 32, seed=1, process_index=1, process_count=2, fetch_batches=True)
  for _ in range(20):  # past an epoch boundary
    next(a)
  b = GrainBatches(source, 32, seed=1, process_index=1, process_count=2, fetch_batches=True)
  b.seek(20)
  np.testing.assert_array_equal(next(a)["x"], next(b)["x"])


def test_a_half_written_checkpoint_is_ignored(tmp_path):
  _fit(tmp_path, steps=8, checkpoint_every=4)
  # What a save killed midway leaves: orbax's temporary directory, never renamed to "12".
  import shutil

  shutil.copytree(tmp_path / "checkpoints" / "8", tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000")
  for root, _, files in os.walk(tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000"):
    for name in files[: len(files) // 2]:
      os.remove(os.path.join(root, name))
  result = _fit(tmp_path, steps=12, checkpoint_every=4)
  assert result.start_step == 8 and int(result.state.step) == 12


def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, monkeypatch):
  _fit(tmp_path, steps=4, checkpoint_every=4)
  wider = toy.MLP(hidden=(48,), out=toy.CLASSES)
  monkeypatch.setattr(
    toy, "init_params", lambda rng: wider.init({"params": rng}, np.zeros((1, toy.DIM), np.float32))["params"]
  )
  with pytest.raises(ckpt.CheckpointMismatchError, match=r"hidden_0.bias has shape \(32,\) there but \(48,\) here"):
    _fit(tmp_path, steps=8)
  assert ckpt.Checkpointer(str(tmp_path)).all_steps() == [4]
  assert not (tmp_path / "checkpoints_unreadable").exists()


def test_one_process_saves_without_replica_slices_and_restores_a_replica_parallel_checkpoint(tmp_path, monkeypatch):
  import jax
  import orbax.checkpoint as ocp

  sliced = []
  slice_in_dim = jax.lax.slice_in_dim

  def counted(*args, **kw):
    sliced.append(args[0].shape)
    return slice_in_dim(*args, **kw)

  monkeypatch.setattr(jax.lax, "slice_in_dim", counted)
  full = _fit(tmp_path / "full", steps=8)  # checkpoints at 4 and 8, written by `_state_handler`
  # catches replica-parallel left on: every replicated array would be sliced once a replica before its write
  assert sliced == []
  with monkeypatch.context() as m:  # orbax's default handler: how several processes write (the control)
    m.setattr(ckpt, "_state_handler", ocp.StandardCheckpointHandler)
    _fit(tmp_path / "resumed", steps=4)
  assert sliced, "the control wrote no replica slices: the count above proves nothing"
  resumed = _fit(tmp_path / "resumed", steps=8)  # restores the replica-parallel checkpoint with ours
  assert resumed.start_step == 4
  chex.assert_trees_all_equal(toy.params_of(resumed.state), toy.params_of(full.state))
