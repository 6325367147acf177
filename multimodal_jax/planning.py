"""`--mode=plan`: an experiment's own steps compiled for an accelerator target it does not have, and read.

A method describes its steps (`PlanStep`: a name, the config key of its batch size and a function that
lowers the step at a given global batch on a mesh); `run_plan` builds the mesh of the user's
`--config.mesh` over the target's compile-only devices (`multimodal_jax.targets`), compiles every step
with the target's own compiler, prints a table and, last, one JSON line, and writes
`WORKDIR/plan/TARGET.json` and the compiled HLO `WORKDIR/plan/TARGET.hlo.txt` (one file per step when
there are several). No dataset is read: shapes come from the config.

`--config.batch_size=max` (or a stage's `*.batch_size=max`) searches for the largest global batch, a
multiple of the data-parallel size, whose step fits: a compile per candidate, each next candidate
interpolated from the two nearest compiled peaks (memory grows about linearly in the batch), until the
batch that fits and the next multiple that does not are adjacent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from multimodal_jax import files, train
from multimodal_jax import sharding as shd
from multimodal_jax.config import MAX_BATCH, get_dotted
from multimodal_jax.errors import UserError
from multimodal_jax.loop import resolve_dtype


@dataclasses.dataclass(frozen=True)
class PlanStep:
  """One step of a method to plan: `lower(batch_size, mesh) -> jax.stages.Lowered`, with its batch size
  read from the config key `batch_key` (dotted for a stage's section); `unit` multiplies the data-parallel
  size to give the batch granularity (e.g. gradient accumulation's microbatches)."""

  name: str
  batch_key: str
  lower: Callable[[int, jax.sharding.Mesh], Any]
  unit: int = 1


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: jax.sharding.Mesh) -> dict:
  """Global batch leaves `{key: (shape, dtype)}` as ShapeDtypeStructs split over the mesh's batch axes."""
  return {
    k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shd.batch_sharding(mesh, len(shape)))
    for k, (shape, dtype) in shapes.items()
  }


def lower_train_step(
  mesh: jax.sharding.Mesh,
  loss_fn: train.LossFn,
  init_params: Callable[[jax.Array], Any],
  shapes: dict[str, tuple[tuple[int, ...], Any]],
  *,
  dtype: str,
  section: Any,
  model_state_fn: Callable[[Any], Any] | None = None,
  freeze_aliases: dict[str, str] | None = None,
) -> Any:
  """The trainer's own step (`train.make_train_step`, as `loop.fit` builds it) lowered for an abstract
  state and a batch of `shapes` (`abstract_batch`) on `mesh`: nothing is allocated. `section` is the
  config (or a stage's sub-config) holding the optimizer, `grad_accum_steps` and `ema_decay` keys."""
  tx, _ = train.make_optimizer(section, freeze_aliases=freeze_aliases)
  batch = abstract_batch(shapes, mesh)
  grad_accum_steps, ema_decay = section.grad_accum_steps, section.ema_decay
  ema = ema_decay > 0
  state, shardings = train.abstract_train_state(init_params, tx, mesh, ema=ema)
  if model_state_fn is not None:
    abstract_model, model_shardings = train.abstract_model_state(model_state_fn, state.params, mesh)
    state, shardings = state.replace(model_state=abstract_model), shardings.replace(model_state=model_shardings)
  step = train.make_train_step(
    loss_fn,
    tx,
    mesh,
    shardings,
    grad_accum_steps=grad_accum_steps,
    compute_dtype=jnp.dtype(dtype),
    ema_decay=ema_decay if ema else None,
  )
  return step.lower(state, batch)


def plan_lowered(lowered: Any, target: Any, dtype: str) -> tuple[dict, Any, dict | None]:
  """`(plan, compiled, compiler options used)` of a step lowered on `target`'s mesh, compiled by its compiler
  (`compiled` None and the plan `fits: False` when libtpu refused it for memory). JAX's persistent compilation
  cache is turned off meanwhile, as a compile-only executable cannot be loaded from it; JAX reads that setting
  once a process, so after an earlier compile it may still try, warn and compile. Shared with benchmarks/scale.py."""
  from multimodal_jax import targets

  started = time.perf_counter()
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    compiled, options, out_of_memory = targets.compile_lowered(lowered, target)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  kwargs = {"compute_dtype": dtype, "compile_s": time.perf_counter() - started}
  if compiled is None:
    plan = targets.plan_out_of_memory(lowered, target, out_of_memory, **kwargs)
  else:
    plan = targets.plan_compiled(lowered, compiled, target, **kwargs)
  return plan, compiled, options


def _compile(step: PlanStep, batch: int, mesh, target, dtype: str) -> tuple[dict, Any]:
  started = time.perf_counter()
  lowered = step.lower(batch, mesh)
  lowered_at = time.perf_counter()
  plan, compiled, options = plan_lowered(lowered, target, dtype)
  plan.update(step=step.name, batch_size=batch, lower_s=lowered_at - started, mesh=dict(mesh.shape))
  plan["compiler_options"] = options or {}
  return plan, compiled


def largest_batch(compile_at: Callable[[int], dict], unit: int, start: int, limit: int = 2**22) -> tuple[int, list]:
  """The largest multiple of `unit` whose plan fits (0 when not even `unit` does), and every plan made.

  A step's peak memory grows about linearly in the batch, so after two probes each next batch is the
  one the line through the two nearest probes puts at the budget (HBM minus the reserve); while no
  probe has failed yet the search at least doubles, and once one has, candidates stay strictly
  between the largest batch that fits and the smallest that does not (the midpoint when the line
  points outside), until the two are one `unit` apart. Linear steps take four or five compiles."""
  plans: list[dict] = []

  def probe(batch: int) -> dict:
    plan = compile_at(batch)
    plans.append(plan)
    print(f"  batch {batch}: peak {plan['peak_gib']:.2f} GiB, fits {plan['fits']}", file=sys.stderr, flush=True)
    return plan

  def at_budget(a: int, pa: dict, b: int, pb: dict) -> int | None:
    """The batch (a multiple of `unit`) where the line through (a, peak a), (b, peak b) meets the budget."""
    slope = (pb["peak_gib"] - pa["peak_gib"]) / (b - a)
    if slope <= 0:
      return None
    budget = pa["hbm_gib"] - pa["reserve_gib"]
    return int((a + (budget - pa["peak_gib"]) / slope) // unit * unit)

  lo = max(unit, start // unit * unit)
  lo_plan = probe(lo)
  if not lo_plan["fits"]:
    if lo == unit or not probe(unit)["fits"]:
      return 0, plans
    hi, hi_plan, lo, lo_plan = lo, lo_plan, unit, plans[-1]
  else:
    hi, hi_plan = None, None
    prev, prev_plan = lo, lo_plan
    nxt = 2 * lo
    while hi is None:
      if nxt > limit:
        return lo, plans
      plan = probe(nxt)
      if plan["fits"]:
        prev, prev_plan, lo, lo_plan = lo, lo_plan, nxt, plan
        guess = at_budget(prev, prev_plan, lo, lo_plan)
        nxt = max(guess if guess is not None else 2 * lo, lo + unit)
        nxt = min(nxt, 8 * lo)
      else:
        hi, hi_plan = nxt, plan
  while hi - lo > unit:
    guess = at_budget(lo, lo_plan, hi, hi_plan)
    if guess is None or not lo < guess < hi:
      guess = (lo + hi) // 2 // unit * unit
      guess = guess if lo < guess < hi else lo + unit
    plan = probe(guess)
    if plan["fits"]:
      lo, lo_plan = guess, plan
    else:
      hi, hi_plan = guess, plan
  return lo, plans


TABLE = (
  ("step", "{}"),
  ("batch_size", "{}"),
  ("peak_gib", "{:.2f}"),
  ("hbm_gib", "{:.1f}"),
  ("fits", "{}"),
  ("state_gib", "{:.2f}"),
  ("temp_gib", "{:.2f}"),
  ("attention", "{}"),
  ("bf16_flop_fraction", "{:.3f}"),
  ("tflops_per_device", "{:.3f}"),
  ("step_s_lower_bound", "{:.4f}"),
  ("compile_s", "{:.1f}"),
)


def _cell(plan: dict, key: str, form: str) -> str:
  value = plan.get(key)
  return "-" if value is None else form.format(value)


def print_table(plans: Sequence[dict]) -> None:
  rows = [[name for name, _ in TABLE]] + [[_cell(p, k, f) for k, f in TABLE] for p in plans]
  widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE))]
  for row in rows:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), flush=True)


def target_file_name(target_text: str) -> str:
  """`tpu:v5p:2x2x2` -> `tpu_v5p_2x2x2` (a file name)."""
  return target_text.replace(":", "_").replace("/", "_")


def plan_mode(make_steps: Callable[[Any, str], Sequence[PlanStep]]) -> Callable[[Any, str], dict]:
  """A method's `--mode=plan` function over its `plan_steps(config, dtype)`."""

  def run(config: Any, workdir: str) -> dict:
    """The steps compiled for `--config.target` without the device (`multimodal_jax.planning`)."""
    return run_plan(config, workdir, make_steps)

  return run


def run_plan(config: Any, workdir: str, make_steps: Callable[[Any, str], Sequence[PlanStep]]) -> dict:
  """Plans every step `make_steps(config, dtype)` gives on `config.target`; returns the last JSON line's
  dict (the first step's plan, with the others under `steps`)."""
  from multimodal_jax import targets

  if not config.target:
    raise UserError("--mode=plan needs --config.target=TARGET, e.g. tpu:v5p:2x2x2, tpu:v5e:2x4 or gpu:h100:8")
  target = targets.parse_target(config.target)
  target.devices()  # a missing compiler is one line here, before any model is built
  dtype = resolve_dtype(config.dtype, target.platform)
  mesh = targets.target_mesh(target, config.mesh)
  dp = shd.data_parallel_size(mesh)
  results = []
  hlo_texts = []
  for step in make_steps(config, dtype):
    setting = get_dotted(config, step.batch_key)
    unit = dp * step.unit
    compiled_of: dict[int, Any] = {}

    def compile_at(batch: int, step=step, compiled_of=compiled_of) -> dict:
      plan, compiled = _compile(step, batch, mesh, target, dtype)
      compiled_of[batch] = compiled
      return plan

    if setting == MAX_BATCH:
      best, tried = largest_batch(compile_at, unit, start=unit * 8)
      if best == 0:
        raise UserError(
          f"{step.batch_key}=max: not even {unit} examples (one per data-parallel device) fit on {target.text}"
        )
      plan = next(p for p in tried if p["batch_size"] == best)
      plan["max_batch_search"] = [
        {"batch_size": p["batch_size"], "peak_gib": p["peak_gib"], "fits": p["fits"]} for p in tried
      ]
      print(
        f"{step.batch_key}=max on {target.text}: {best} (global; {best // dp} per data-parallel device)", flush=True
      )
    else:
      if setting % unit:
        raise UserError(
          f"{step.batch_key}={setting} must be divisible by {unit} (the mesh's data-parallel devices x grad_accum_steps)"
        )
      plan = compile_at(setting)
    compiled = compiled_of.get(plan["batch_size"])
    hlo_texts.append((step.name, compiled.as_text() if compiled is not None else ""))
    results.append(plan)
  summary = dict(results[0])
  if len(results) > 1:
    summary["steps"] = {p["step"]: p for p in results}
    summary["fits"] = all(p["fits"] for p in results)
  out_dir = os.path.join(workdir, "plan")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  name = target_file_name(target.text)
  files.write_json(os.path.join(out_dir, f"{name}.json"), summary)
  for step_name, text in hlo_texts:
    suffix = "" if len(hlo_texts) == 1 else f".{step_name}"
    files.atomic_write_text(os.path.join(out_dir, f"{name}{suffix}.hlo.txt"), text)
  print_table(results)
  print(
    f"plan of {target.text} ({target.n_devices} x {target.device_kind}, {targets.compiler_version(target)}): a compile-time plan, "
    "not a run; step_s_lower_bound is a roofline estimate (peak FLOP/s and HBM bandwidth, no collectives)",
    flush=True,
  )
  print(json.dumps(summary, default=str), flush=True)
  return summary
