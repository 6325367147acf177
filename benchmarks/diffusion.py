"""Latent diffusion on CPU: our DiT against diffusers' UNet2DConditionModel, in one process.

  python -m benchmarks.diffusion [--repeats 5] [--train-steps 5] [--torch-threads N] [--no-torch]
      [--width 256 --depth 5 --heads 4 --patch 2]

1. Train step, batch 64 of 8x8x4 latents with 8 context tokens of width 128, AdamW, epsilon loss
   (uniform timesteps of the scaled-linear schedule): diffusers' UNet2DConditionModel (block_out_channels
   (64, 128), one layer per block, CrossAttnDownBlock2D + DownBlock2D / UpBlock2D + CrossAttnUpBlock2D,
   cross_attention_dim 128, attention_head_dim 8; PyTorch eager, float32) against our jitted
   `train.make_train_step` around `models.dit.DiT` of about the same forward FLOPs (both printed).
2. DDIM-50 sampling, batch 16, no guidance: diffusers' DDIMScheduler Python loop around the UNet
   (torch.inference_mode) against our `diffusion.sample` (one jitted lax.scan) around the DiT.

Warm-up first, then the sides interleaved (order alternating), medians over repeats; torch uses
all CPUs (as XLA does). Rates per wall-clock second and per CPU-second of the process are printed. The CPU time other processes took meanwhile is printed: PyTorch slows more
than XLA when the cores are shared, so compare figures from a quiet machine. `python -m` re-execs
with tcmalloc when installed (MMJ_NO_TCMALLOC=1: glibc malloc).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  from multimodal_jax.launch import maybe_reexec_with_tcmalloc

  maybe_reexec_with_tcmalloc()

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import busy_cpu_seconds, matmul_peak, own_cpu_seconds, warn_if_shared
from multimodal_jax import profiling, train
from multimodal_jax import sharding as shd
from multimodal_jax.latent_diffusion import diffusion as df
from multimodal_jax.latent_diffusion import dit

SIZE, CHANNELS, CONTEXT, CONTEXT_DIM = 8, 4, 8, 128
TRAIN_BATCH, SAMPLE_BATCH, SAMPLE_STEPS = 64, 16, 50
LR = 1e-4


def dit_for_benchmark(width: int = 256, depth: int = 5, heads: int = 4, patch: int = 2) -> dit.DiTConfig:
  """A DiT on 8x8x4 latents whose forward FLOPs are close to the UNet's (defaults: ~10.7 GFLOP / 64)."""
  return dit.DiTConfig(
    input_size=SIZE,
    in_channels=CHANNELS,
    patch_size=patch,
    width=width,
    depth=depth,
    num_heads=heads,
    context_dim=CONTEXT_DIM,
  )


def synthetic(batch: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "x0": rng.normal(size=(batch, SIZE, SIZE, CHANNELS)).astype(np.float32),
    "context": rng.normal(size=(batch, CONTEXT, CONTEXT_DIM)).astype(np.float32),
    "mask": np.ones((batch, CONTEXT), bool),
  }


class Ours:
  """The DiT: jitted train step (1-device mesh, state donated) and jitted DDIM sampler."""

  def __init__(self, cfg: dit.DiTConfig):
    self.model = model = dit.DiT(cfg)
    self.schedule = schedule = df.make_schedule("scaled_linear")
    batch = synthetic(TRAIN_BATCH)
    mesh = shd.make_mesh("data:1", jax.devices()[:1])

    def init_params(rng):
      return model.init(rng, batch["x0"][:1], np.zeros(1, np.int32), batch["context"][:1], batch["mask"][:1])["params"]

    def loss_fn(params, b, rng):
      return df.diffusion_loss(
        lambda x, t: model.apply({"params": params}, x, t, b["context"], b["mask"]), schedule, b["x0"], rng
      )

    tx = optax.adamw(LR)
    _, shardings = train.abstract_train_state(init_params, tx, mesh)
    self.state = train.init_train_state(init_params, tx, shardings, jax.random.key(0))
    step = train.make_train_step(loss_fn, tx, mesh, shardings)
    self.batch = shd.host_to_global_batch(batch, mesh)
    t0 = time.perf_counter()
    self.train_step = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    # XLA's cost analysis counts a rolled loop's body once: count the forward on the unrolled twin.
    twin = dit.DiT(dataclasses.replace(cfg, scan_unroll=True))
    forward = jax.jit(
      lambda p, b: twin.apply({"params": p}, b["x0"], jnp.zeros(TRAIN_BATCH, jnp.int32), b["context"], b["mask"])
    )
    self.forward_flops = profiling.cost_analysis_flops(forward.lower(self.state.params, self.batch).compile())

    def sample(params, x_T, context, mask, rng):
      model_fn = functools.partial(lambda p, x, t: model.apply({"params": p}, x, t, context, mask), params)
      return df.sample(model_fn, schedule, x_T, rng, sampler="ddim", num_steps=SAMPLE_STEPS)

    s = synthetic(SAMPLE_BATCH, seed=1)
    self.sample_args = (s["x0"], s["context"], s["mask"], jax.random.key(1))
    self.sampler = jax.jit(sample).lower(self.state.params, *self.sample_args).compile()
    self.train(2)
    self.sample(1)

  def train(self, steps: int) -> float:
    for _ in range(steps):
      self.state, metrics = self.train_step(self.state, self.batch)
    return float(metrics["loss"])

  def sample(self, repeats: int) -> float:
    for _ in range(repeats):
      out = self.sampler(self.state.params, *self.sample_args)
    return float(out.block_until_ready()[0, 0, 0, 0])


def unet(torch):
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  return UNet2DConditionModel(
    sample_size=SIZE,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=8,
  )


class Theirs:
  """diffusers' UNet, eager PyTorch: the train step (forward, MSE to the noise, backward, AdamW) and
  the DDIMScheduler loop."""

  def __init__(self, threads: int):
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    self.torch = torch
    torch.set_num_threads(threads)
    self.model = unet(torch).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
    self.noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    self.ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    b = synthetic(TRAIN_BATCH)
    self.x0 = torch.from_numpy(b["x0"].transpose(0, 3, 1, 2).copy())
    self.context = torch.from_numpy(b["context"])
    s = synthetic(SAMPLE_BATCH, seed=1)
    self.x_T = torch.from_numpy(s["x0"].transpose(0, 3, 1, 2).copy())
    self.sample_context = torch.from_numpy(s["context"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
      self.model(self.x0, torch.zeros(TRAIN_BATCH, dtype=torch.long), self.context)
    self.forward_flops = counter.get_total_flops()
    self.train(2)
    self.sample(1)

  def train(self, steps: int) -> float:
    torch = self.torch
    for _ in range(steps):
      noise = torch.randn_like(self.x0)
      t = torch.randint(0, 1000, (TRAIN_BATCH,))
      x_t = self.noise_scheduler.add_noise(self.x0, noise, t)
      self.opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.mse_loss(self.model(x_t, t, self.context).sample, noise)
      loss.backward()
      self.opt.step()
    return loss.item()

  def sample(self, repeats: int) -> float:
    torch = self.torch
    self.model.eval()
    with torch.inference_mode():
      for _ in range(repeats):
        self.ddim.set_timesteps(SAMPLE_STEPS)
        x = self.x_T
        for t in self.ddim.timesteps:
          x = self.ddim.step(self.model(x, t, self.sample_context).sample, t, x).prev_sample
    self.model.train()
    return float(x[0, 0, 0, 0])


def _rate(fn, n: int, examples: int) -> tuple[float, float]:
  """Examples per second of wall time and per CPU-second of this process (both sides run in it,
  one at a time; the second is less sensitive to other processes on the machine)."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn(n)
  return examples * n / (time.perf_counter() - t0), examples * n / (time.process_time() - c0)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--train-steps", type=int, default=5, help="train steps per timed repeat")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: all CPUs, as XLA uses")
  parser.add_argument("--no-torch", action="store_true", help="time ours only")
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=5)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--patch", type=int, default=2)
  args = parser.parse_args(argv)
  allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
  cfg = dit_for_benchmark(args.width, args.depth, args.heads, args.patch)
  sides = {"ours": Ours(cfg)}
  if not args.no_torch:
    sides["diffusers"] = Theirs(args.torch_threads)
  train_rates = {name: [] for name in sides}
  sample_rates = {name: [] for name in sides}
  busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
  for i in range(args.repeats):
    for name in list(sides)[:: 1 if i % 2 == 0 else -1]:
      train_rates[name].append(_rate(sides[name].train, args.train_steps, TRAIN_BATCH))
      sample_rates[name].append(_rate(sides[name].sample, 1, SAMPLE_BATCH))
  busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
  others = None if busy0 is None else max(busy1 - busy0 - (own1 - own0), 0.0) / (wall1 - wall0)
  peak = matmul_peak()

  ours = sides["ours"]
  fwd = {"ours": ours.forward_flops}
  if "diffusers" in sides:
    fwd["diffusers"] = sides["diffusers"].forward_flops
  print(
    f"Latent diffusion on CPU: allocator {allocator}; {os.cpu_count()} CPUs; torch threads "
    f"{args.torch_threads if 'diffusers' in sides else '-'}; matmul peak (1024^2) {peak / 1e9:.0f} GFLOP/s; "
    "other processes used " + ("n/a" if others is None else f"{others:.2f} CPUs") + " while timing"
  )
  print(
    f"ours: DiT width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size} "
    f"({cfg.num_patches} tokens), train step compiles in {ours.compile_s:.1f} s; forward per batch of 64: "
    + ", ".join(f"{k} {v / 1e9:.2f} GFLOP" for k, v in fwd.items())
    + " (ours: XLA cost analysis; diffusers: torch FlopCounterMode, matmuls and convs only)"
  )
  print(f"{'benchmark':<34} | {'side':>9} | {'examples/s':>10} | {'per CPU-s':>9} | all repeats (examples/s)")
  for title, rates in [
    (f"train step (batch {TRAIN_BATCH}, AdamW)", train_rates),
    (f"DDIM-{SAMPLE_STEPS} sampling (batch {SAMPLE_BATCH})", sample_rates),
  ]:
    med = {name: [statistics.median(x[k] for x in r) for k in (0, 1)] for name, r in rates.items()}
    for name, r in rates.items():
      print(
        f"{title:<34} | {name:>9} | {med[name][0]:>10.1f} | {med[name][1]:>9.1f} | "
        + " ".join(f"{x[0]:.1f}" for x in r)
      )
    if "diffusers" in rates:
      ratio, cpu_ratio = (med["ours"][k] / med["diffusers"][k] for k in (0, 1))
      per = statistics.median(a[0] / b[0] for a, b in zip(rates["ours"], rates["diffusers"], strict=True))
      print(
        f"{title:<34} | {'ratio':>9} | {ratio:>9.2f}x | {cpu_ratio:>8.2f}x | median of per-repeat ratios {per:.2f}x"
      )
  warn_if_shared(others)


if __name__ == "__main__":
  sys.exit(main())
