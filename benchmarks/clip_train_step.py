"""CLIP train-step throughput: ours (JAX, `train.make_train_step` on a 1-device mesh) against
open_clip's (PyTorch eager, CPU), same architecture, batch, loss and optimizer, interleaved.

  python -m benchmarks.clip_train_step [--batch 128] [--steps 10] [--repeats 5] [--gelu exact|tanh]
      [--torch-threads N] [--no-torch]

Architecture (both sides): embed 128; ViT image 32, patch 4, width 128, 4 layers, 4 heads; text
context 16, vocab 1000, width 128, 4 layers, 4 heads; MLP ratio 4; exact (erf) GELU unless
`--gelu tanh` (ours only: it changes the function, so say so when quoting it); float32; AdamW
(lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.1 on every parameter); the symmetric
softmax CLIP loss. Both sides see the same batch and run on the same threads of the same process
(one after the other, never at once). Prints examples/s of each (median over repeats), the
ratio, the allocator, torch's thread count, a matmul peak measured in the same run and the
CPU time other processes took meanwhile (PyTorch's OpenMP threads collapse when other processes
want the cores, XLA's much less: compare figures from a quiet machine). `python -m` re-execs with
tcmalloc when installed (MMJ_NO_TCMALLOC=1: glibc malloc).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  from multimodal_jax.launch import maybe_reexec_with_tcmalloc

  maybe_reexec_with_tcmalloc()

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import busy_cpu_seconds, matmul_peak, own_cpu_seconds, warn_if_shared
from multimodal_jax import profiling, train
from multimodal_jax import sharding as shd
from multimodal_jax.clip import model as clip

LR, BETAS, EPS, WD = 5e-4, (0.9, 0.98), 1e-6, 0.1
EMBED, WIDTH, LAYERS, HEADS, IMAGE, PATCH, CONTEXT, VOCAB = 128, 128, 4, 4, 32, 4, 16, 1000


def config(activation: str = "gelu") -> clip.ClipConfig:
  return clip.ClipConfig(
    embed_dim=EMBED,
    vision=clip.VisionConfig(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS),
    text=clip.TextConfig(vocab_size=VOCAB, context_length=CONTEXT, width=WIDTH, layers=LAYERS, heads=HEADS),
    activation=activation,
  )


def synthetic_batch(batch: int, seed: int = 0) -> dict:
  """`image [b, 32, 32, 3]` float32; `text [b, 16]` int32: ids in [1, vocab - 2], the end-of-text
  id vocab - 1 (the largest, where open_clip's argmax pooling looks) and zero padding."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
  text = np.zeros((batch, CONTEXT), np.int32)
  for i, n in enumerate(rng.integers(2, CONTEXT + 1, batch)):
    text[i, : n - 1] = rng.integers(1, VOCAB - 1, n - 1)
    text[i, n - 1] = VOCAB - 1
  return {"image": images, "text": text}


def local_clip_softmax_loss(img: jnp.ndarray, txt: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """The symmetric InfoNCE loss of normalized `img`, `txt` `[b, d]` at temperature 1 / `scale`."""
  logits = scale * (img.astype(jnp.float32) @ txt.astype(jnp.float32).T)
  labels = jnp.arange(logits.shape[0])
  li = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
  lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
  return (li + lt) / 2


def clip_loss():
  """`(loss, name)`: `multimodal_jax.losses.clip_softmax_loss` when it exists, else the local copy."""
  from multimodal_jax.clip import losses

  shared = getattr(losses, "clip_softmax_loss", None)
  return (shared, "losses.clip_softmax_loss") if shared is not None else (local_clip_softmax_loss, "local")


class Ours:
  """The JAX train step on a 1-device mesh, state donated step to step."""

  def __init__(self, batch: dict, cfg: clip.ClipConfig | None = None, compiler_options: dict | None = None):
    self.model = clip.CLIP(cfg or config())
    loss, self.loss_name = clip_loss()
    example = {k: v[:1] for k, v in batch.items()}
    mesh = shd.make_mesh("data:1", jax.devices()[:1])
    model = self.model

    def init_params(rng):
      return model.init({"params": rng}, example["image"], example["text"])["params"]

    def loss_fn(params, batch, rng):
      img, txt, scale, _ = model.apply({"params": params}, batch["image"], batch["text"])
      return loss(img, txt, scale), {}

    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    _, shardings = train.abstract_train_state(init_params, tx, mesh)
    self.state = train.init_train_state(init_params, tx, shardings, jax.random.key(0))
    self.step = train.make_train_step(loss_fn, tx, mesh, shardings)
    self.batch = shd.host_to_global_batch(batch, mesh)
    t0 = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch).compile(compiler_options)
    self.compile_s = time.perf_counter() - t0
    self.flops = profiling.cost_analysis_flops(self.compiled)
    self.run(2)

  def run(self, steps: int) -> float:
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
    return float(metrics["loss"])


class Theirs:
  """open_clip's CLIP, eager PyTorch: forward, ClipLoss, backward, AdamW step."""

  def __init__(self, batch: dict, threads: int | None = None):
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    self.torch = torch
    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.model = open_clip.model.CLIP(
      embed_dim=EMBED,
      vision_cfg={
        "image_size": IMAGE,
        "patch_size": PATCH,
        "width": WIDTH,
        "layers": LAYERS,
        "head_width": WIDTH // HEADS,
      },
      text_cfg={"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": LAYERS},
    ).train()
    self.loss = ClipLoss()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    self.images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    self.text = torch.from_numpy(batch["text"].astype(np.int64))
    self.run(2)

  def run(self, steps: int) -> float:
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      img, txt, scale = self.model(self.images, self.text)
      loss = self.loss(img, txt, scale)
      loss.backward()
      self.opt.step()
    return loss.item()


def timed(side, steps: int, batch: int) -> float:
  t0 = time.perf_counter()
  side.run(steps)
  return batch * steps / (time.perf_counter() - t0)


def train_flops(batch: int) -> float:
  """3x the forward matmul FLOPs of one train step (both towers, attention included)."""
  tokens, hidden = (IMAGE // PATCH) ** 2 + 1, 4 * WIDTH

  def tower(length: int) -> float:
    per_layer = 2 * length * (4 * WIDTH * WIDTH + 2 * WIDTH * hidden) + 2 * 2 * length * length * WIDTH
    return LAYERS * per_layer + 2 * WIDTH * EMBED

  patch = 2 * (tokens - 1) * PATCH * PATCH * 3 * WIDTH
  return 3 * batch * (tower(tokens) + tower(CONTEXT) + patch)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--gelu", choices=("exact", "tanh"), default="exact")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: all CPUs, as XLA uses")
  parser.add_argument("--no-torch", action="store_true", help="time ours only (no open_clip)")
  args = parser.parse_args(argv)
  batch = synthetic_batch(args.batch)
  allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
  ours = Ours(batch, config(activation="gelu" if args.gelu == "exact" else "gelu_tanh"))
  sides = {"ours": ours}
  threads = "-"
  if not args.no_torch:
    theirs = Theirs(batch, args.torch_threads)
    threads = theirs.torch.get_num_threads()
    sides["open_clip"] = theirs
  rates = {name: [] for name in sides}
  busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
  for i in range(args.repeats):  # interleaved, the order alternating
    for name in list(sides)[:: 1 if i % 2 == 0 else -1]:
      rates[name].append(timed(sides[name], args.steps, args.batch))
  busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
  others = None if busy0 is None else max(busy1 - busy0 - (own1 - own0), 0.0) / (wall1 - wall0)
  peak = matmul_peak()
  med = {name: statistics.median(r) for name, r in rates.items()}
  flops = train_flops(args.batch)
  xla = f"{ours.flops / 1e9:.1f}" if ours.flops else "n/a"
  print(
    f"CLIP train step, batch {args.batch}, float32, {args.gelu} GELU (ours), loss {ours.loss_name}; "
    f"allocator {allocator}; torch threads {threads}; {os.cpu_count()} CPUs; ours compiles in "
    f"{ours.compile_s:.1f} s; {flops / 1e9:.1f} GFLOP/step (3x forward matmuls; XLA counts {xla}); "
    f"matmul peak (1024^2) {peak / 1e9:.0f} GFLOP/s; other processes used "
    + ("n/a" if others is None else f"{others:.2f} CPUs")
    + " while timing"
  )
  print(f"{'side':>10} | {'examples/s':>10} | {'GFLOP/s':>8} | {'of peak':>7} | all repeats")
  for name, r in rates.items():
    achieved = flops * med[name] / args.batch
    print(
      f"{name:>10} | {med[name]:>10.1f} | {achieved / 1e9:>8.1f} | {achieved / peak:>7.1%} | "
      f"{' '.join(f'{x:.0f}' for x in r)}"
    )
  if "open_clip" in med:
    ratios = [a / b for a, b in zip(rates["ours"], rates["open_clip"], strict=True)]
    print(
      f"ours / open_clip: {med['ours'] / med['open_clip']:.2f}x "
      f"(median of per-repeat ratios {statistics.median(ratios):.2f}x)"
    )
  warn_if_shared(others, "the ratio is")


if __name__ == "__main__":
  sys.exit(main())
