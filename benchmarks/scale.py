"""The memory plan, from the real compilers: large models' train steps lowered and compiled (never run) for
TPU v5p and H100 targets this machine does not have (`multimodal_jax.targets`), and what each device
would hold and do.

  python -m benchmarks.scale                                   # every row on tpu:v5p and gpu:h100 (hours)
  python -m benchmarks.scale --target tpu:v5p:2x2x2 --only ViT-B-16 --rows-only   # one row (~3 min)
  python -m benchmarks.scale --target gpu:h100 --ratios-only    # the two JSON ratios only
  python -m benchmarks.scale --target gpu:h100:8 --only ViT-B-16 --max-batch --remat none,full
  python -m benchmarks.scale --target cpu --only ViT-B-16 --rows-only   # the CPU compiler's plan (docs/scale.md)

A target is a family (`tpu:v5p`: 8 chips `tpu:v5p:2x2x2` and 64 `tpu:v5p:4x4x4`; `gpu:h100`: `gpu:h100:8`
and `gpu:h100:8x8`), one slice (`gpu:h100:8`: its size's rows only) or `cpu` (simulated CPU devices, 8
and 64: the CPU compiler's plan, kept for the comparison in docs/scale.md; fits/roofline are None).

Rows (bfloat16 compute, float32 params and AdamW state; attention "auto": cuDNN's fused kernel for
unmasked self-attention on H100, XLA's on TPU):
- CLIP ViT-B/16 at 4,096 on fsdp:8 (8 devices): the step of `python -m experiments.clip --mode=plan
  --config.model=ViT-B-16 --config.image_tower=vit --config.tokenizer=clip_bpe --config.batch_size=4096
  --config.mesh=fsdp:8`, built by `multimodal_jax.clip.plan.plan_steps` from that config, with
  `channels=3` (RGB; the experiment's embedded digits give 1 channel) and its default loss (gathered).
- CLIP ViT-L/14 at 32,768 on fsdp:64 and data:8,fsdp:8, ViT-B/16 at 32,768 on fsdp:64 (64 devices,
  the chunked (ring) contrastive loss).
- DiT-XL/2 on 32x32x4 latents with cross-attention to 77 tokens of width 768 (batch 256), AVDCNN `wide`
  (batch 4,096), on fsdp:8.

Per row, per device: the target and its compiler's version, mesh, global batch, peak/temporaries/state
GiB (XLA's memory analysis; peak = arguments + outputs - donated + temporaries), whether it fits (HBM
minus the target's reserve), the attention kernel, the bf16 share of matmul FLOPs, executed TFLOP, the
bytes each collective moves, the roofline step time (max(FLOPs / peak, HBM bytes / bandwidth), no
collectives: a lower bound) and the MFU it bounds (model FLOPs: the step as written, without remat; over that time
at the peak), compile seconds. `--max-batch` searches each row's largest global batch that fits
(`planning.largest_batch`, 4-6 compiles) and reports it per data-parallel device.

The last line printed is one JSON object: `state_ratio_fsdp64` (per-device parameter + AdamW bytes of
CLIP ViT-L/14 on fsdp:64 over data:64, from the state's shardings: no compile) and `loss_temp_ratio_32k`
(temporaries of the chunked over the gathered contrastive loss alone, forward + backward on
`[32768, 512]` embeddings over 64 devices, from the first 64-device target's compile), with the rows.
`--jsonl FILE` appends every row (and the ratios) to FILE as it finishes.
"""

from __future__ import annotations

import os
import sys

CPU_DEVICES = 64


def _prepare() -> None:
  """Before JAX starts: compile-only targets need `prepare_environment`; `--target cpu` needs simulated devices."""
  if "cpu" in " ".join(sys.argv[1:]).replace("=", " ").split():
    flag = f"--xla_force_host_platform_device_count={CPU_DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  from multimodal_jax import targets

  targets.prepare_environment()


if __name__ == "__main__":
  _prepare()

import argparse
import dataclasses
import json
import math
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from multimodal_jax import planning, targets, train
from multimodal_jax import sharding as shd
from multimodal_jax.clip import losses
from multimodal_jax.targets import analysis

GiB = 2**30
from benchmarks.scale_workloads import Workload, clip_config, workloads

FAMILIES = {"tpu:v5p": {8: "tpu:v5p:2x2x2", 64: "tpu:v5p:4x4x4"}, "gpu:h100": {8: "gpu:h100:8", 64: "gpu:h100:8x8"}}
DEFAULT_TARGETS = ("tpu:v5p", "gpu:h100")
CPU_HBM = 96 * GiB  # no budget on a CPU: fits/roofline are dropped from CPU rows


# ---------------------------------------------------------------------------------------------- workloads


# ---------------------------------------------------------------------------------------------- targets


def cpu_target(n: int):
  """A stand-in `Target` of n simulated CPU devices (the plan's memory fields only mean something)."""
  devices = jax.devices("cpu")[:n]
  if len(devices) < n:
    raise SystemExit(
      f"--target cpu needs {n} CPU devices, JAX has {len(devices)}: run it as python -m benchmarks.scale"
    )
  return types.SimpleNamespace(
    text=f"cpu:{n}", platform="cpu", model="cpu", n_devices=n, hosts=1, device_kind=devices[0].device_kind,
    hbm_bytes=CPU_HBM, reserve_bytes=0, peak_bf16_flops=1.0, hbm_bandwidth=1.0, devices=lambda: devices,
  )  # fmt: skip


def resolve_targets(names) -> dict[int, list]:
  """{devices: [Target, ...]} of the --target arguments (families, slices or cpu)."""
  out: dict[int, list] = {8: [], 64: []}
  for name in names:
    if name == "cpu":
      for n in (8, 64):
        out[n].append(cpu_target(n))
      continue
    texts = FAMILIES[name].values() if name in FAMILIES else [name]
    for text in texts:
      target = targets.parse_target(text)
      out.setdefault(target.n_devices, []).append(target)
  return out


def version(target) -> str:
  if target.platform == "cpu":
    return f"jaxlib {jax.lib.__version__} (CPU)" if hasattr(jax.lib, "__version__") else f"jax {jax.__version__} (CPU)"
  return targets.compiler_version(target)


def mesh_of(target, spec: str):
  if target.platform == "cpu":
    return shd.make_mesh(spec, target.devices())
  return targets.target_mesh(target, spec)


def recount_flops(plan: dict, text: str, target) -> None:
  """Adds `*_recounted` fields to a TPU plan: the executed TFLOP, their bf16 share and the roofline step time,
  counted as `plan_compiled` counts them but for convolutions (`_recount_conv_flops`) and stepped loop
  counters (`_stepped_trip_count`). libtpu 0.0.42.1's ViT-B/16 step: 15,300 TFLOP a device by the plain
  count, 62.85 recounted, 62.83 in the program as written."""
  totals = analysis.analyze(text)  # targets now counts libtpu convolutions by taps and stepped loops
  plan["tflops_per_device_recounted"] = totals.flops / 1e12
  plan["bf16_flop_fraction_recounted"] = totals.bf16_flops / totals.flops if totals.flops else None
  compute_s = totals.flops / target.peak_bf16_flops  # a TPU: every FLOP at the peak, as plan_compiled
  plan["hbm_gib_accessed_recounted"] = totals.hbm_bytes / GiB
  plan["collective_gib_recounted"] = {k: v / GiB for k, v in sorted(totals.collective_bytes().items())}
  plan["step_s_lower_bound_recounted"] = max(compute_s, totals.hbm_bytes / target.hbm_bandwidth)


def compile_plan(lowered, target, model_tflops: float | None = None) -> dict:
  """The target compiler's plan of a lowered step (libtpu's refusal for memory is a plan too)."""
  if target.platform == "cpu":  # compiled as usual: the compilation cache stays on
    started = time.perf_counter()
    compiled, options = lowered.compile(), {}
    plan = targets.plan_compiled(
      lowered, compiled, target, compute_dtype="bfloat16", compile_s=time.perf_counter() - started
    )
  else:
    plan, compiled, options = planning.plan_lowered(lowered, target, "bfloat16")
  plan["compiler_options"] = options or {}
  if compiled is not None and target.platform == "tpu":
    recount_flops(plan, compiled.as_text(), target)
  step_s = plan.get("step_s_lower_bound_recounted", plan.get("step_s_lower_bound"))
  model = model_tflops if model_tflops is not None else plan.get("model_tflops_per_device")
  plan["mfu_bound"] = model * 1e12 / (step_s * target.peak_bf16_flops) if step_s and model else None
  if target.platform == "cpu":
    plan.update(fits=None, hbm_gib=None, reserve_gib=None, step_s_lower_bound=None, mfu_bound=None)
  return plan


def plan_row(work: Workload, target, spec: str, batch: int) -> dict:
  mesh = mesh_of(target, spec)
  started = time.perf_counter()
  lowered = work.lower(batch, mesh)
  lower_s = time.perf_counter() - started
  model = None
  if work.plain_lower is not None:  # MFU counts the model's FLOPs, not remat's recomputation
    plain = work.plain_lower(batch, mesh).as_text(dialect="hlo")
    model = analysis.analyze(plain).flops / target.n_devices / 1e12
  plan = compile_plan(lowered, target, model)
  plan["model_tflops_no_remat"] = model
  plan.update(model=work.name, mesh_spec=spec, mesh=dict(mesh.shape), batch_size=batch, lower_s=lower_s)
  plan["per_device_batch"] = batch // shd.data_parallel_size(mesh)
  plan["compiler"] = version(target)
  return plan


def max_batch_row(work: Workload, target, spec: str) -> dict:
  """The largest global batch of `work` that fits (a multiple of the data-parallel size), its plan, the search."""
  mesh = mesh_of(target, spec)
  dp = shd.data_parallel_size(mesh)
  best, tried = planning.largest_batch(lambda b: plan_row(work, target, spec, b), dp, start=work.batch)
  plan = next((p for p in tried if p["batch_size"] == best), dict(tried[-1], batch_size=0, fits=False))
  plan = dict(plan, max_batch=best, max_batch_per_device=best // dp)
  plan["max_batch_search"] = [
    {"batch_size": p["batch_size"], "peak_gib": p["peak_gib"], "fits": p["fits"]} for p in tried
  ]
  return plan


# ---------------------------------------------------------------------------------------------- the ratios


def vit_l_state_bytes(target, spec: str) -> int:
  """Per-device parameter + optimizer bytes of the CLIP experiment's ViT-L/14 on `spec` (shardings only)."""
  from multimodal_jax.clip import settings as clip_settings
  from multimodal_jax.clip import weights as clip_weights
  from multimodal_jax.clip.build import build

  config = clip_config("ViT-L-14", 32768, spec, "chunked")
  _, _, init_params = build(clip_settings.resolve(config))
  tx, _ = train.make_optimizer(config, freeze_aliases=clip_weights.FREEZE_ALIASES)
  abstract, _ = train.abstract_train_state(init_params, tx, mesh_of(target, spec))
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
  )


def loss_plan(target, batch: int, impl: str, dim: int = 512) -> dict:
  """Temporaries of the contrastive loss's forward + backward alone on `[batch, dim]` embeddings (data:-1)."""
  mesh = mesh_of(target, "data:-1")
  loss = losses.clip_softmax_loss_chunked if impl == "chunked" else losses.clip_softmax_loss_gathered

  def f(img, txt, scale):
    return jax.value_and_grad(lambda i, t: loss(i, t, scale, mesh, shd.BATCH_AXES), argnums=(0, 1))(img, txt)

  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=shd.batch_sharding(mesh, 2))
  lowered = jax.jit(f).lower(emb, emb, jax.ShapeDtypeStruct((), jnp.float32))
  plan = compile_plan(lowered, target)
  keep = ("target", "temp_gib", "peak_gib", "collective_gib", "compile_s")
  return {"impl": impl, "batch": batch, "compiler": version(target), **{k: plan.get(k) for k in keep}}


# ---------------------------------------------------------------------------------------------- output


def _fmt_collectives(c: dict | None) -> str:
  short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A"}
  short["collective-permute"] = "CP"
  return " ".join(f"{short.get(k, k)} {v:.2f}" for k, v in (c or {}).items() if v >= 0.005) or "-"


def _f(value, form: str) -> str:
  return "-" if value is None else form.format(value)


def _u(r: dict, key: str):
  """A TPU row's FLOP figure with convolutions counted tap by tap (`_recount_conv_flops`), else the plan's own."""
  return r.get(f"{key}_recounted", r.get(key))


COLUMNS = (
  ("target", 14, lambda r: r["target"]),
  ("model", 30, lambda r: r["model"]),
  ("mesh", 14, lambda r: r["mesh_spec"]),
  ("batch", 6, lambda r: str(r["batch_size"])),
  ("/dev", 5, lambda r: str(r["per_device_batch"])),
  ("peak", 7, lambda r: _f(r["peak_gib"], "{:.2f}")),
  ("temp", 7, lambda r: _f(r["temp_gib"], "{:.2f}")),
  ("state", 6, lambda r: _f(r["state_gib"], "{:.2f}")),
  ("fits", 5, lambda r: str(r["fits"])),
  ("attention", 9, lambda r: str(r["attention"])),
  ("bf16", 5, lambda r: _f(_u(r, "bf16_flop_fraction"), "{:.3f}")),
  ("TFLOP", 7, lambda r: _f(_u(r, "tflops_per_device"), "{:.2f}")),
  ("step s", 7, lambda r: _f(_u(r, "step_s_lower_bound"), "{:.3f}")),
  ("MFU<=", 5, lambda r: _f(r["mfu_bound"], "{:.2f}")),
  ("comp s", 6, lambda r: _f(r["compile_s"], "{:.0f}")),
)


def print_header() -> None:
  print(
    "\nper device; GiB; peak = arguments + outputs - donated + temporaries; TFLOP executed per step; step s: the "
    "roofline lower bound; MFU<=: model FLOPs / (step s * peak); AG/RS/AR/A2A/CP: collective GiB",
    flush=True,
  )
  print(" | ".join(f"{name:>{w}}" for name, w, _ in COLUMNS) + " | collectives GiB | compiler", flush=True)


def print_row(r: dict) -> None:
  cells = " | ".join(f"{get(r):>{w}}" for _, w, get in COLUMNS)
  print(f"{cells} | {_fmt_collectives(_u(r, 'collective_gib'))} | {r['compiler']}", flush=True)


def _remat_value(text: str):
  """A `--remat` word: none|full|dots|dots_no_batch (true / false: full / none)."""
  return {"false": "none", "true": "full"}.get(text.lower(), text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", action="append", help="tpu:v5p, gpu:h100, a slice (gpu:h100:8) or cpu; repeatable")
  parser.add_argument("--only", default="", help="comma list: keep the rows whose model contains one (ViT-L-14,DiT)")
  parser.add_argument("--meshes", default="", help="';'-separated mesh specs to keep (e.g. 'fsdp:64')")
  parser.add_argument("--devices", default="", help="comma list of row sizes to keep (8, 64)")
  parser.add_argument("--batch", type=int, default=0, help="override every kept row's global batch")
  parser.add_argument(
    "--remat", default="none", help="comma list of CLIP remat policies (none,full,dots,dots_no_batch)"
  )
  parser.add_argument("--max-batch", action="store_true", help="search each row's largest batch that fits")
  parser.add_argument("--rows-only", action="store_true", help="skip the ratios")
  parser.add_argument("--ratios-only", action="store_true", help="the two JSON ratios only")
  parser.add_argument("--jsonl", default="", help="append every row and the ratios to this file as they finish")
  args = parser.parse_args(argv)
  started = time.perf_counter()
  by_size = resolve_targets(args.target or DEFAULT_TARGETS)

  def record(obj: dict) -> None:
    if args.jsonl:
      with open(args.jsonl, "a") as f:
        f.write(json.dumps(obj, default=float) + "\n")

  rows: list[dict] = []
  if not args.ratios_only:
    keep = [k.strip() for k in args.only.split(",") if k.strip()]
    meshes = [m.strip() for m in args.meshes.split(";") if m.strip()]
    sizes = [int(s) for s in args.devices.split(",") if s.strip()]
    remats = [_remat_value(r.strip()) for r in args.remat.split(",") if r.strip()]
    works = [w for w in workloads(remats) if (not keep or any(k in w.name for k in keep))]
    works = [w for w in works if not sizes or w.devices in sizes]
    print_header()
    for work in works:
      for target in by_size.get(work.devices, []):
        for spec in work.meshes:
          if meshes and spec not in meshes:
            continue
          if args.batch:
            work = dataclasses.replace(work, batch=args.batch)
          row = max_batch_row(work, target, spec) if args.max_batch else plan_row(work, target, spec, work.batch)
          rows.append(row)
          record(row)
          print_row(row)
  result: dict = {}
  if not args.rows_only:
    big = (by_size.get(64) or [None])[0]
    if big is None:
      raise SystemExit("the ratios need a 64-device target (tpu:v5p:4x4x4, gpu:h100:8x8 or cpu)")
    state = {spec: vit_l_state_bytes(big, spec) for spec in ("data:-1", "fsdp:64")}
    pair = {impl: loss_plan(big, 32768, impl) for impl in ("gathered", "chunked")}
    print(f"\nstate of ViT-L/14 per device on {big.text}: data:64 {state['data:-1'] / GiB:.3f} GiB, "
          f"fsdp:64 {state['fsdp:64'] / GiB:.3f} GiB")  # fmt: skip
    for p in pair.values():
      print(f"contrastive loss alone at 32,768 on {big.text}, {p['impl']}: temporaries {p['temp_gib'] * 1024:.1f} MiB")
    result = {
      "state_ratio_fsdp64": state["fsdp:64"] / state["data:-1"],
      "loss_temp_ratio_32k": pair["chunked"]["temp_gib"] / pair["gathered"]["temp_gib"],
      "ratio_target": big.text,
      "ratio_compiler": version(big),
      "loss": list(pair.values()),
    }
    record(result)
  print(json.dumps({**result, "seconds": round(time.perf_counter() - started, 1), "rows": rows}, default=float))


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  sys.exit(main())
