"""A memory plan from compiled steps: the real train steps of large models lowered and compiled (never
run) for simulated meshes of 8 and 64 CPU devices, and what XLA says each device would need.

  python -m benchmarks.scale            # every model and mesh (see docs/scale.md for the time it takes)
  python -m benchmarks.scale --quick    # ViT-L/14 on data:64 and fsdp:64 and the loss plan only
  python -m benchmarks.scale --rows-only --only DiT --meshes 'fsdp:8'   # some model/mesh rows alone

Models (bfloat16 compute, float32 params and AdamW state, scanned layers with one layer per loop
trip): CLIP ViT-B/16 at global batch 32,768 with the chunked (ring) contrastive loss, CLIP ViT-L/14
at the same batch, DiT-XL/2 on 32x32x4 latents with cross-attention to 77 text tokens of width 768
(batch 256), AVDCNN `wide` (batch 4,096). Attention is "xla" (jax.nn.dot_product_attention): the
GPU default, cuDNN's, cannot be compiled on a CPU, so attention temporaries here are an upper bound.

Per model and mesh, per device: parameter + optimizer bytes (from the state's shardings), the
compiled program's arguments and temporaries (`compiled.memory_analysis()`), matmul TFLOPs (the
lowered HLO with loops counted in full, divided by the devices), the bytes each kind of collective
moves (from the compiled HLO), and the compile time. Then the contrastive loss alone (forward and
backward of the loss on `[batch, 512]` embeddings), gathered against chunked, at 512 rows per
device on 8 to 64 devices and at 8k-32k rows on 64; and compile times of one tower against its
depth, scanned and unrolled.

The last line printed is one JSON object: `state_ratio_fsdp64` (per-device parameter + optimizer
bytes of CLIP ViT-L/14 on fsdp:64 over those on data:64) and `loss_temp_ratio_32k` (temporaries of
the chunked loss over the gathered loss, batch 32,768 on 64 devices), with the rest of the table.
"""

from __future__ import annotations

import os
import sys

DEVICES = 64


def _reexec_with_devices() -> None:
  """XLA reads the simulated device count once, when JAX starts: set it and start again."""
  flag = f"--xla_force_host_platform_device_count={DEVICES}"
  if flag in os.environ.get("XLA_FLAGS", ""):
    return
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(), JAX_PLATFORMS="cpu")
  os.execve(sys.executable, [sys.executable, "-m", "benchmarks.scale", *sys.argv[1:]], env)


if __name__ == "__main__":
  _reexec_with_devices()

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multimodal_jax import profiling, train
from multimodal_jax import sharding as shd
from multimodal_jax.avdcnn import model as avdcnn
from multimodal_jax.clip import losses
from multimodal_jax.clip import model as clip
from multimodal_jax.latent_diffusion import dit

GiB = 2**30
MESHES_64 = ("data:-1", "data:8,fsdp:8", "fsdp:64", "data:16,tensor:4")
MESHES_8 = ("data:-1", "fsdp:8")


@dataclasses.dataclass
class Workload:
  """A train step to compile: params, loss and the global batch's shapes."""

  name: str
  init_params: Callable
  loss_fn_for: Callable  # mesh -> loss_fn(params, batch, rng)
  batch: dict  # name -> (shape, dtype), global


def _sds(shape, dtype, mesh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))


def clip_workload(preset: str, batch: int, loss_impl: str = "chunked", remat: bool = False) -> Workload:
  cfg = dataclasses.replace(clip.PRESETS[preset], scan_unroll=1, attention="xla", remat=remat)
  model = clip.CLIP(cfg)
  size, context = cfg.vision.image_size, cfg.text.context_length

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, size, size, 3)), jnp.ones((1, context), jnp.int32))["params"]

  def loss_fn_for(mesh):
    loss = losses.clip_softmax_loss_chunked if loss_impl == "chunked" else losses.clip_softmax_loss_gathered

    def loss_fn(params, batch, rng):
      del rng
      images = batch["image"].astype(jnp.bfloat16) / 127.5 - 1.0
      img, txt, scale, _ = model.apply({"params": params}, images, batch["text"])
      return loss(img.astype(jnp.float32), txt.astype(jnp.float32), scale, mesh, shd.BATCH_AXES), {}

    return loss_fn

  shapes = {"image": ((batch, size, size, 3), jnp.uint8), "text": ((batch, context), jnp.int32)}
  label = f"CLIP {preset} b{batch} {loss_impl}" + (" remat" if remat else "")
  return Workload(label, init_params, loss_fn_for, shapes)


def dit_workload(batch: int = 256) -> Workload:
  cfg = dit.dit_config("XL", input_size=32, patch_size=2, context_dim=768, dtype="bfloat16", attention="xla")
  model = dit.DiT(cfg)
  context = 77

  def init_params(rng):
    x, t = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,), jnp.int32)
    return model.init({"params": rng}, x, t, jnp.zeros((1, context, 768)), jnp.ones((1, context), bool))["params"]

  def loss_fn_for(mesh):
    del mesh
    alphas = jnp.cos(jnp.linspace(0.0, 0.5 * math.pi, 1000)) ** 2  # a cosine schedule's alpha-bar

    def loss_fn(params, batch, rng):
      t_key, n_key = jax.random.split(rng)
      x0 = batch["latents"]
      t = jax.random.randint(t_key, (x0.shape[0],), 0, 1000)
      noise = jax.random.normal(n_key, x0.shape, x0.dtype)
      a = alphas[t][:, None, None, None].astype(x0.dtype)
      x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
      out = model.apply({"params": params}, x_t, t, batch["context"], batch["mask"])
      return jnp.mean(jnp.square(out - noise.astype(jnp.float32))), {}

    return loss_fn

  shapes = {
    "latents": ((batch, 32, 32, 4), jnp.float32),
    "context": ((batch, context, 768), jnp.float32),
    "mask": ((batch, context), jnp.bool_),
  }
  return Workload(f"DiT-XL/2 b{batch}", init_params, loss_fn_for, shapes)


def avdcnn_workload(batch: int = 4096) -> Workload:
  from multimodal_jax.avdcnn import losses as exp_losses

  model = avdcnn.AVDCNN(avdcnn.PRESETS["wide"])
  init_params = avdcnn.make_init_params(model)

  def loss_fn_for(mesh):
    del mesh
    return exp_losses.make_loss_fn(model, mu=1.0, loss="compressed")

  bins, frames = avdcnn.BINS, avdcnn.CONTEXT
  shapes = {
    "audio": ((batch, bins, frames), jnp.float32),
    "lips": ((batch, frames, *avdcnn.LIPS_SHAPE), jnp.uint8),
    "target": ((batch, bins), jnp.float32),
    "mean": ((batch, bins), jnp.float32),
    "std": ((batch, bins), jnp.float32),
  }
  return Workload(f"AVDCNN wide b{batch}", init_params, loss_fn_for, shapes)


def _state_bytes(abstract_state) -> int:
  """Bytes of one device's shard of every leaf of the train state."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state)
  )


def state_bytes(work: Workload, spec: str, devices) -> int:
  """Per-device parameter + AdamW bytes of `work` on mesh `spec` (from the shardings alone)."""
  abstract, _ = train.abstract_train_state(work.init_params, optax.adamw(1e-4), shd.make_mesh(spec, devices))
  return _state_bytes(abstract)


def plan(work: Workload, spec: str, devices) -> dict:
  """Lowers and compiles `work`'s train step on mesh `spec`; what each device would hold and do."""
  mesh = shd.make_mesh(spec, devices)
  tx = optax.adamw(1e-4, weight_decay=0.1)
  t0 = time.perf_counter()
  abstract, shardings = train.abstract_train_state(work.init_params, tx, mesh)
  step = train.make_train_step(work.loss_fn_for(mesh), tx, mesh, shardings, compute_dtype=jnp.bfloat16)
  batch = {k: _sds(shape, dtype, mesh) for k, (shape, dtype) in work.batch.items()}
  lowered = step.lower(abstract, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  n = len(devices)
  flops = profiling.step_flops(lowered)
  collectives = profiling.hlo_collective_bytes(compiled.as_text())
  return {
    "model": work.name,
    "mesh": spec,
    "devices": n,
    "state_gib": _state_bytes(abstract) / GiB,
    "args_gib": memory.argument_size_in_bytes / GiB,
    "temp_gib": memory.temp_size_in_bytes / GiB,
    "peak_gib": (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes) / GiB
    + memory.temp_size_in_bytes / GiB,
    "tflops_per_device": (flops or 0.0) / n / 1e12,
    "collective_gib": {k: v / GiB for k, v in sorted(collectives.items())},
    "lower_s": t1 - t0,
    "compile_s": t2 - t1,
  }


def loss_plan(batch: int, devices, impl: str, dim: int = 512) -> dict:
  """Temporaries of the contrastive loss's forward + backward alone on `[batch, dim]` embeddings."""
  mesh = shd.make_mesh("data:-1", devices)
  loss = losses.clip_softmax_loss_chunked if impl == "chunked" else losses.clip_softmax_loss_gathered

  def f(img, txt, scale):
    return jax.value_and_grad(lambda i, t: loss(i, t, scale, mesh, shd.BATCH_AXES), argnums=(0, 1))(img, txt)

  emb = _sds((batch, dim), jnp.float32, mesh)
  t0 = time.perf_counter()
  compiled = jax.jit(f).lower(emb, emb, jax.ShapeDtypeStruct((), jnp.float32)).compile()
  memory = compiled.memory_analysis()
  return {
    "impl": impl,
    "batch": batch,
    "devices": len(devices),
    "temp_mib": memory.temp_size_in_bytes / 2**20,
    "compile_s": time.perf_counter() - t0,
  }


def depth_plan(layers: int, scanned: bool) -> dict:
  """Compile time of a ViT-B/16 image tower's forward + backward (batch 8, float32, one device) at a depth."""
  from multimodal_jax.layers import Transformer, TransformerOptions

  model = Transformer(layers, 12, options=TransformerOptions(unroll=1 if scanned else True, attention="xla"))
  x = jax.ShapeDtypeStruct((8, 197, 768), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  t0 = time.perf_counter()
  jax.jit(jax.grad(lambda p, x: model.apply(p, x).sum())).lower(params, x).compile()
  return {"layers": layers, "scanned": scanned, "compile_s": time.perf_counter() - t0}


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    out = ""
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  model = fields.get("Model name", platform.processor() or "unknown CPU").strip()
  return f"{model}, {os.cpu_count()} CPUs, {platform.machine()}"


def _fmt_collectives(c: dict) -> str:
  short = {
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-reduce": "AR",
    "all-to-all": "A2A",
    "collective-permute": "CP",
  }
  return " ".join(f"{short[k]} {v:.2f}" for k, v in c.items() if v >= 0.005) or "-"


def print_header() -> None:
  print(
    f"{'model':<30} | {'mesh':<16} | {'state GiB':>9} | {'args GiB':>8} | {'temp GiB':>8} | {'peak GiB':>8} | "
    f"{'TFLOP/dev':>9} | {'compile s':>9} | collectives GiB/dev"
  )


def print_row(r: dict) -> None:
  mesh = f"{r['mesh']} ({r['devices']})"
  print(
    f"{r['model']:<30} | {mesh:<16} | {r['state_gib']:>9.3f} | {r['args_gib']:>8.2f} | "
    f"{r['temp_gib']:>8.2f} | {r['peak_gib']:>8.2f} | {r['tflops_per_device']:>9.2f} | {r['compile_s']:>9.1f} | "
    f"{_fmt_collectives(r['collective_gib'])}",
    flush=True,
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="ViT-L/14 on data:64 and fsdp:64 and the loss plan only")
  parser.add_argument(
    "--only", default="", help="comma list: keep the models whose name contains one (e.g. DiT,AVDCNN)"
  )
  parser.add_argument("--meshes", default="", help="';'-separated mesh specs to keep (e.g. 'data:-1;fsdp:64')")
  parser.add_argument(
    "--rows-only", action="store_true", help="the model/mesh rows only: skip the loss and depth tables and the checks"
  )
  args = parser.parse_args(argv)
  devices = jax.devices()
  if len(devices) < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices, JAX has {len(devices)}: run it as python -m benchmarks.scale")
  started = time.perf_counter()
  print(f"compiled on {cpu_name()}; jax {jax.__version__}; {len(devices)} simulated devices", flush=True)

  rows: list[dict] = []
  vit_l = clip_workload("ViT-L-14", 32768)
  if args.quick:
    jobs = [(vit_l, "data:-1", devices), (vit_l, "fsdp:64", devices)]
  else:
    jobs = [(vit_l, spec, devices) for spec in MESHES_64]
    jobs += [(clip_workload("ViT-L-14", 32768, remat=True), "fsdp:64", devices)]
    vit_b = clip_workload("ViT-B-16", 32768)
    jobs += [(vit_b, spec, devices) for spec in MESHES_64]
    jobs += [(clip_workload("ViT-B-16", 32768, "gathered"), "fsdp:64", devices)]
    jobs += [(clip_workload("ViT-B-16", 4096), spec, devices[:8]) for spec in MESHES_8]
    for work in (dit_workload(), avdcnn_workload()):
      jobs += [(work, spec, devices) for spec in MESHES_64]
      jobs += [(work, spec, devices[:8]) for spec in MESHES_8]
  keep = [k.strip() for k in args.only.split(",") if k.strip()]
  meshes = [m.strip() for m in args.meshes.split(";") if m.strip()]
  jobs = [
    (w, spec, d) for w, spec, d in jobs if (not keep or any(k in w.name for k in keep)) and spec in (meshes or [spec])
  ]
  print(
    "\nper device; peak = arguments + outputs - donated + temporaries; AG/RS/AR/A2A/CP: all-gather, "
    "reduce-scatter, all-reduce, all-to-all, collective-permute"
  )
  print_header()
  for work, spec, devs in jobs:
    rows.append(plan(work, spec, devs))
    print_row(rows[-1])
  if args.rows_only:
    print(
      json.dumps({"cpu": cpu_name(), "seconds": round(time.perf_counter() - started, 1), "rows": rows}, default=float)
    )
    return
  state = {spec: state_bytes(vit_l, spec, devices) for spec in ("data:-1", "fsdp:64")}  # shapes only, no compile

  print("\ncontrastive loss alone (forward + backward, [batch, 512] float32 embeddings, mesh data:-1), per device")
  print(f"{'batch':>6} | {'devices':>7} | {'gathered temp MiB':>17} | {'chunked temp MiB':>16} | ratio")
  loss_rows = []
  sizes = [(512 * n, n) for n in (8, 16, 32, 64)] + [(8192, 64), (16384, 64)]
  for batch, n in sorted(set(sizes)):
    pair = {impl: loss_plan(batch, devices[:n], impl) for impl in ("gathered", "chunked")}
    loss_rows += list(pair.values())
    g, c = pair["gathered"]["temp_mib"], pair["chunked"]["temp_mib"]
    print(f"{batch:>6} | {n:>7} | {g:>17.1f} | {c:>16.1f} | {c / g:.4f}", flush=True)
  at_32k = {r["impl"]: r["temp_mib"] for r in loss_rows if r["batch"] == 32768 and r["devices"] == 64}

  depth_rows = []
  if not args.quick:
    print("\ncompile time of a ViT-B/16 tower's forward + backward against depth (batch 8, one device)")
    print(f"{'layers':>6} | {'scanned s':>9} | {'unrolled s':>10}")
    for layers in (6, 12, 24):
      pair = [depth_plan(layers, scanned) for scanned in (True, False)]
      depth_rows += pair
      print(f"{layers:>6} | {pair[0]['compile_s']:>9.1f} | {pair[1]['compile_s']:>10.1f}", flush=True)

  result = {
    "state_ratio_fsdp64": state["fsdp:64"] / state["data:-1"],
    "loss_temp_ratio_32k": at_32k["chunked"] / at_32k["gathered"],
    "cpu": cpu_name(),
    "seconds": round(time.perf_counter() - started, 1),
    "rows": rows,
    "loss": loss_rows,
    "depth": depth_rows,
  }
  print(json.dumps(result, default=float))


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  sys.exit(main())
