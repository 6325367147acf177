"""The training loop: resume, step, log, evaluate, checkpoint, stop on a non-finite loss.

`fit` is model-agnostic: it takes a loss function, a params initialiser, an optimizer and an
iterator of per-process numpy batches, and owns everything else about a run in a workdir.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from multimodal_jax import checkpoint as ckpt
from multimodal_jax import metrics as mt
from multimodal_jax import sharding as shd
from multimodal_jax import train

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/Inf; the run stopped with the last good checkpoint kept."""


class TrainData(Protocol):
  """Per-process batches: `next()` gives this process's rows of the next global batch."""

  def __next__(self) -> Any: ...

  @property
  def iterator(self) -> Any: ...  # the checkpointable grain iterator (or None)

  def seek(self, step: int) -> None: ...  # position at the batch of a given step


@dataclasses.dataclass
class LoopConfig:
  steps: int
  batch_size: int  # global
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate only at the end
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  grad_accum_steps: int = 1
  dtype: str = "float32"
  ema_decay: float = 0.0  # 0 disables the EMA

  @classmethod
  def from_config(cls, config: Any) -> LoopConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


@dataclasses.dataclass
class FitResult:
  state: train.TrainState
  start_step: int  # the step the run resumed from (0 when it started fresh)
  eval_metrics: dict


def fit(
  *,
  workdir: str,
  cfg: LoopConfig,
  mesh: jax.sharding.Mesh,
  loss_fn: train.LossFn,
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  train_data: TrainData,
  eval_fn: Callable[[Any, int], dict] | None = None,
  learning_rate_fn: Callable | None = None,
  config_dict: dict | None = None,
) -> FitResult:
  """Trains until `cfg.steps`, resuming from the newest readable checkpoint in `workdir`.

  `eval_fn(params, step) -> metrics` gets the EMA params when the EMA is on. Raises
  NonFiniteLossError (after keeping the last good checkpoint) if a step's loss is NaN/Inf.
  """
  is_main = jax.process_index() == 0
  ema = cfg.ema_decay > 0
  abstract_state, shardings = train.abstract_train_state(init_params, tx, mesh, ema=ema)
  checkpointer = ckpt.Checkpointer(workdir, max_to_keep=cfg.keep_checkpoints)
  start_step = 0
  if checkpointer.latest_step() is not None:
    start_step, state, data_restored = checkpointer.restore(abstract_state, train_data.iterator)
    if not data_restored:
      train_data.seek(start_step)
    if is_main:
      print(f"resumed from the checkpoint at step {start_step} in {checkpointer.directory}", flush=True)
  else:
    state = train.init_train_state(init_params, tx, shardings, jax.random.key(cfg.seed), ema=ema)

  step_fn = train.make_train_step(
    loss_fn,
    tx,
    mesh,
    shardings,
    seed=cfg.seed,
    grad_accum_steps=cfg.grad_accum_steps,
    compute_dtype=jnp.dtype(cfg.dtype),
    ema_decay=cfg.ema_decay if ema else None,
    learning_rate_fn=learning_rate_fn,
  )
  writer = mt.MetricWriter(workdir, start_step, enabled=is_main)
  eval_writer = mt.MetricWriter(workdir, start_step, enabled=is_main, name="eval")
  progress = mt.Progress(start_step, cfg.steps, enabled=is_main)
  throughput = mt.Throughput()
  eval_metrics: dict = {}
  last_saved = start_step if start_step else None
  pending: tuple[int, dict] | None = None  # metrics of the newest step, checked one step late

  def check(step: int, metrics: dict) -> dict:
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
      checkpointer.wait()
      kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written yet"
      raise NonFiniteLossError(
        f"loss became {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])}) at step {step}; "
        f"the run stopped and {kept}. Lower the learning rate or check the data, then rerun to resume."
      )
    return metrics

  def run_eval(step: int) -> None:
    nonlocal eval_metrics
    if eval_fn is not None:
      params = state.ema_params if ema else state.params
      eval_metrics = {k: float(v) for k, v in eval_fn(params, step).items()}
      eval_writer.write(step, eval_metrics)

  try:
    for step in range(start_step, cfg.steps):
      batch = shd.host_to_global_batch(next(train_data), mesh)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if pending is not None:
        prev_step, prev = pending
        prev = check(prev_step, prev)
        _maybe_log(writer, progress, throughput, prev_step, prev, cfg)
      pending = (done, metrics)
      throughput.add(cfg.batch_size)
      if done == start_step + 1:
        jax.block_until_ready(metrics)
        throughput.rate()  # exclude the first step's compilation from examples/s
      save = done % cfg.checkpoint_every == 0 or done == cfg.steps
      evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
      if save or evaluate:
        prev = check(*pending)
        _maybe_log(writer, progress, throughput, done, prev, cfg)
        pending = None
        if evaluate:
          run_eval(done)
        if save:
          checkpointer.save(done, state, train_data.iterator, config_dict)
          last_saved = done
    if pending is not None:
      check(*pending)
    if start_step >= cfg.steps and is_main:
      print(f"the checkpoint is at step {start_step} >= steps={cfg.steps}: nothing to train", flush=True)
  finally:
    checkpointer.close()
    writer.close()
    eval_writer.close()
    progress.close()
  return FitResult(state=state, start_step=start_step, eval_metrics=eval_metrics)


def _maybe_log(writer, progress, throughput, step, metrics, cfg):
  progress.update(step, float(metrics["loss"]))
  if step % cfg.log_every and step not in (1, cfg.steps):
    return
  rate = throughput.rate()
  values = {k: v for k, v in metrics.items() if k != "finite"}
  values["examples_per_sec"] = rate if math.isfinite(rate) else 0.0
  writer.write(step, values)
