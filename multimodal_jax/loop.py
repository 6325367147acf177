"""The training loop: resume, step, log, evaluate, checkpoint, stop on a non-finite loss.

`fit` is model-agnostic: it takes a loss function, a params initialiser, an optimizer and an
iterator of per-process numpy batches, and owns everything else about a run in a workdir.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from multimodal_jax import checkpoint as ckpt
from multimodal_jax import init_from, profiling, train
from multimodal_jax import metrics as mt
from multimodal_jax import sharding as shd

log = logging.getLogger(__name__)
# The shared keys and checks are declared in loop_config; experiments read them through `loop` as before.
from multimodal_jax.loop_config import (  # noqa: F401
  SECTION_KEYS,
  TOP_KEYS,
  LoopConfig,
  base_config,
  base_keys,
  base_rules,
  batch_relation,
  check_batch,
  resolve_dtype,
)


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/Inf; the run stopped with the last good checkpoint kept."""


# A batch column the loop takes out of each batch before the step: per-record counts of unusable samples the
# data replaced (`data.wds`), logged as `skipped_samples`, their sum over all processes and over the steps since
# the previous logged step (so a checkpoint at a logged step resumes to the same lines).
SKIPPED_KEY = "skipped_samples"


class TrainData(Protocol):
  """Per-process batches: `next()` gives this process's rows of the next global batch."""

  def __next__(self) -> Any: ...

  @property
  def iterator(self) -> Any: ...  # the checkpointable grain iterator (or None)

  def seek(self, step: int) -> None: ...  # position at the batch of a given step


@dataclasses.dataclass
class FitResult:
  state: train.TrainState
  start_step: int  # the step the run resumed from (0 when it started fresh)
  eval_metrics: dict


def fit(
  *,
  workdir: str,
  config: Any,
  mesh: jax.sharding.Mesh,
  loss_fn: train.LossFn,
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  train_data: TrainData,
  eval_fn: Callable[[Any, int], dict] | None = None,
  learning_rate_fn: Callable | None = None,
  section: str | None = None,
  model_state_fn: Callable[[Any], Any] | None = None,
  converters: Mapping[str, Callable[[str, Any], Any]] | None = None,
) -> FitResult:
  """Trains until `steps`, resuming from the newest readable checkpoint in `workdir`.

  `config` (a ConfigDict or dict) is the experiment's whole config: the loop reads its keys from it
  (`LoopConfig.from_config(config, section)`, `section` naming a stage's sub-config) and saves it
  with every checkpoint, so that evaluation can rebuild the model from the workdir alone.

  `eval_fn(params, step) -> metrics` gets the EMA params when the EMA is on. `model_state_fn(params)
  -> model_state` (e.g. population batch-norm statistics) is called before every checkpoint save on
  the params being saved (the EMA params when the EMA is on); its result is the state's
  `model_state`, saved with them, so every checkpoint holds state consistent with its params. Raises
  NonFiniteLossError (after keeping the last good checkpoint) if a step's loss is NaN/Inf.
  """
  cfg = LoopConfig.from_config(config, section)
  cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, shd.mesh_platform(mesh)))
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  config_dict["dtype"] = cfg.dtype  # recorded resolved: evaluation uses what training did
  is_main = jax.process_index() == 0
  ema = cfg.ema_decay > 0
  abstract_state, shardings = train.abstract_train_state(init_params, tx, mesh, ema=ema)
  if model_state_fn is not None:
    saved_params = abstract_state.ema_params if ema else abstract_state.params
    abstract_model, model_shardings = train.abstract_model_state(model_state_fn, saved_params, mesh)
    abstract_state = abstract_state.replace(model_state=abstract_model)
    shardings = shardings.replace(model_state=model_shardings)
  checkpointer = ckpt.Checkpointer(workdir, max_to_keep=cfg.keep_checkpoints)
  start_step = 0
  if checkpointer.latest_step() is not None:
    start_step, state, data_restored = checkpointer.restore(abstract_state, train_data.iterator)
    if not data_restored:
      train_data.seek(start_step)
    if is_main:
      print(f"resumed from the checkpoint at step {start_step} in {checkpointer.directory}", flush=True)
  else:
    init_shardings = shardings.replace(model_state=None)
    state = train.init_train_state(init_params, tx, init_shardings, jax.random.key(cfg.seed), ema=ema)
    if model_state_fn is not None:  # a placeholder until the first save computes it
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_model)
      state = state.replace(model_state=jax.device_put(zeros, model_shardings))
    params = init_from.initial_params(cfg.init_from, abstract_state.params, converters or {}) if cfg.init_from else None
    if params is not None:
      # The EMA gets its own buffers: the step donates the state, and one buffer in two leaves would be freed twice.
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params) if ema else None)
      if is_main:
        print(f"initialised the params from {cfg.init_from}", flush=True)

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
  writer, eval_writer = mt.writers(
    workdir, start_step, is_main, config_dict.get("report_to", "tensorboard"), config_dict
  )
  progress = mt.Progress(start_step, cfg.steps, enabled=is_main)
  throughput = mt.Throughput()
  window = profiling.ProfileWindow(cfg.profile_steps, os.path.join(workdir, "profile"))
  compiled, cost = None, {}  # the step compiled once (its FLOPs from the lowered HLO), the last rates

  def device_metrics(examples_per_sec: float) -> dict:
    """TFLOP/s per device, MFU where the device's peak is known, peak device memory where reported."""
    device = jax.local_devices()[0]
    steps_per_sec = examples_per_sec / cfg.batch_size
    cost.update(
      profiling.throughput_metrics(cost.get("flops"), steps_per_sec, mesh.size, device.device_kind, cfg.dtype)
    )
    out = {k: v for k, v in cost.items() if k != "flops"}
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out

  eval_metrics: dict = {}
  last_saved = start_step if start_step else None
  pending: tuple[int, dict] | None = None  # metrics of the newest step, checked one step late
  skips = {"taken": None, "logged": 0}  # SKIPPED_KEY summed over the batches taken (None: no such column), logged

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
      batch = shd.host_to_global_batch(_take_skipped(next(train_data), skips), mesh)
      if compiled is None:
        lowered = step_fn.lower(state, batch)
        compiled, cost["flops"] = lowered.compile(), profiling.step_flops(lowered)
      window.before(step)
      state, metrics = compiled(state, batch)
      window.after(step, metrics)
      done = step + 1
      if pending is not None:
        prev_step, prev = pending
        prev = check(prev_step, prev)
        _maybe_log(writer, progress, throughput, prev_step, prev, cfg, device_metrics, skips)
      pending = (done, metrics if skips["taken"] is None else {**metrics, SKIPPED_KEY: skips["taken"]})
      throughput.add(cfg.batch_size)
      if done == start_step + 1:
        jax.block_until_ready(metrics)
        throughput.rate()  # exclude the first step's compilation from examples/s
      save = done % cfg.checkpoint_every == 0 or done == cfg.steps
      evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
      if save or evaluate:
        prev = check(*pending)
        _maybe_log(writer, progress, throughput, done, prev, cfg, device_metrics, skips)
        pending = None
        if evaluate:
          run_eval(done)
        if save:
          if model_state_fn is not None:
            model_state = model_state_fn(state.ema_params if ema else state.params)
            state = state.replace(model_state=jax.device_put(model_state, model_shardings))
          checkpointer.save(done, state, train_data.iterator, config_dict)
          last_saved = done
    if pending is not None:
      check(*pending)
    if start_step >= cfg.steps and is_main:
      print(f"the checkpoint is at step {start_step} >= steps={cfg.steps}: nothing to train", flush=True)
    elif is_main and cost.get("flops"):
      rates = f"{cost['flops'] / 1e12:.4g} TFLOP per step"
      if "tflops_per_sec_per_device" in cost:
        rates += f", {cost['tflops_per_sec_per_device']:.4g} TFLOP/s per device"
      print(rates + (f", MFU {cost['mfu']:.1%}" if "mfu" in cost else ""), flush=True)
  finally:
    if hasattr(train_data, "close"):
      train_data.close()  # grain's worker processes, when it has them
    window.close()
    checkpointer.close()
    writer.close()
    eval_writer.close()
    progress.close()
  return FitResult(state=state, start_step=start_step, eval_metrics=eval_metrics)


def _take_skipped(batch, skips: dict):
  """The batch without its `SKIPPED_KEY` column, whose sum is added to `skips["taken"]`."""
  if isinstance(batch, dict) and SKIPPED_KEY in batch:
    batch = dict(batch)
    skips["taken"] = (skips["taken"] or 0) + int(batch.pop(SKIPPED_KEY).sum())
  return batch


def _maybe_log(writer, progress, throughput, step, metrics, cfg, device_metrics=None, skips=None):
  progress.update(step, float(metrics["loss"]))
  if step % cfg.log_every and step not in (1, cfg.steps):
    return
  rate = throughput.rate()
  values = {k: v for k, v in metrics.items() if k != "finite"}
  values["examples_per_sec"] = rate if math.isfinite(rate) else 0.0
  if device_metrics is not None:
    values.update(device_metrics(values["examples_per_sec"]))
  if skips is not None and SKIPPED_KEY in values:  # the total through `step`: logged as the count since the last line
    total = int(values[SKIPPED_KEY])
    values[SKIPPED_KEY] = total - skips["logged"]
    if jax.process_count() > 1:  # every process logs at the same steps
      from jax.experimental import multihost_utils

      values[SKIPPED_KEY] = int(multihost_utils.process_allgather(jnp.asarray(values[SKIPPED_KEY])).sum())
    skips["logged"] = total
  writer.write(step, values)
