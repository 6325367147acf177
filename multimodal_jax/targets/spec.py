"""What an accelerator target is: `parse_target("tpu:v5p:2x2x2")` -> a `Target` with the facts a
compile-time plan compares against (memory, peak FLOP/s and bandwidth per device, the reserve).

The device facts live in the tables below, one row per chip: they are published figures, kept here so
that a plan can be made on a machine with no accelerator. Nothing here starts a compiler; `Target.devices()`
does (see `devices.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re

from multimodal_jax.errors import UserError
from multimodal_jax.targets.devices import Target

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Facts of one accelerator model, per compile-only device (a TPU core as the compiler sees it, a GPU)."""

  device_kind: str  # what `device.device_kind` says on the real machine
  hbm_bytes: int
  peak_bf16_flops: float  # dense, no sparsity
  hbm_bandwidth: float  # bytes/s
  reserve_bytes: int  # kept out of the plan's budget (see the reserves below)


# Memory a program may not use:
# - TPU: what the compiler itself keeps out. libtpu refuses to compile a program whose temporaries exceed
#   its budget ("Ran out of memory on HBM ... exceeds available HBM (15.75G)"); the reserves below are
#   its memory size minus that budget, measured with libtpu 0.0.42.1 (v4 16 - 15.25 GiB per core,
#   v5e 16 - 15.75, v5p 96 - 95.74, v6e 31.5 - 31.25).
# - GPU, 10% of HBM: the compiler checks nothing; the CUDA context, cuBLAS/cuDNN handles and NCCL's
#   buffers live outside XLA's memory pool, and the pool's best-fit allocator fragments. A training
#   launch sets XLA_PYTHON_CLIENT_MEM_FRACTION to 0.9 or so; JAX's default (0.75, preallocated at start)
#   gives programs only 75% of HBM, so with it a plan that "fits" by less than 15% of HBM will still run
#   out of memory.
GPU_RESERVE = 0.10

# TPU types, per compile-only device with libtpu's memory size. v4's devices are TensorCores, two per
# chip (the topology API has no megacore mode), so its figures are half a chip's: 275 TFLOP/s and 1.2 TB/s
# per chip.
TPU_CHIPS: dict[str, Chip] = {
  "v4": Chip("TPU v4", 16 * GiB, 137.5e12, 0.6e12, 3 * GiB // 4),
  "v5e": Chip("TPU v5 lite", 16 * GiB, 197e12, 0.819e12, GiB // 4),
  "v5p": Chip("TPU v5", 96 * GiB, 459e12, 2.765e12, int(0.26 * GiB)),
  "v6e": Chip("TPU v6 lite", 63 * GiB // 2, 918e12, 1.64e12, GiB // 4),
}
# Topology dimensions per TPU type: 3-D tori (v4, v5p) and 2-D meshes (v5e, v6e).
TPU_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}


# GPU models; memory and bandwidth are those of the spec file `specs/<model>.txtpb` (what the CUDA
# runtime reports: H100 "80 GB" is 79.1 GiB usable).
def _gpu(kind: str, hbm: int, flops: float, bandwidth: float) -> Chip:
  return Chip(kind, hbm, flops, bandwidth, int(hbm * GPU_RESERVE))


GPU_CHIPS: dict[str, Chip] = {
  "h100": _gpu("NVIDIA H100 80GB HBM3", 84942979072, 989e12, 3.35232e12),
  "h200": _gpu("NVIDIA H200", 151397597184, 989e12, 4.8e12),
  "a100": _gpu("NVIDIA A100-SXM4-80GB", 85100068864, 312e12, 2.03904e12),
  "b200": _gpu("NVIDIA B200", 191514411008, 2250e12, 7.67232e12),
}
MAX_GPUS_PER_HOST = 8

EXAMPLES = "e.g. tpu:v5e:2x4, tpu:v5p:2x2x2, gpu:h100:8, gpu:h200:8x8"


def _bad(text: str, why: str) -> UserError:
  return UserError(f"--config.target={text}: {why}")


def _dims(text: str, topology: str, want: int | None) -> list[int]:
  """The positive integers of an `AxBxC` string, `want` of them when given."""
  if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", topology):
    raise _bad(text, f"topology {topology!r} is not positive sizes joined by 'x' ({EXAMPLES})")
  dims = [int(d) for d in topology.split("x")]
  if want is not None and len(dims) != want:
    shape = "x".join("N" * want)
    raise _bad(text, f"topology {topology!r} has {len(dims)} dimensions; this TPU type takes {want} ({shape})")
  return dims


def _make(text: str, platform: str, model: str, topology: str, n: int, hosts: int, chip: Chip) -> Target:
  """The target with `chip`'s facts: a Chip's fields are the Target's device fields, by the same names."""
  return Target(text, platform, model, topology, n_devices=n, hosts=hosts, **dataclasses.asdict(chip))


def parse_target(text: str) -> Target:
  """`tpu:TYPE:TOPOLOGY` (TYPE in TPU_CHIPS) or `gpu:MODEL:N` / `gpu:MODEL:NxHOSTS` (N GPUs per host).

  Raises UserError with one line naming what is wrong. The device count of a TPU target is the chips
  times the devices per chip (2 on v4, 1 elsewhere); its host count is the compiler's, known once
  `devices()` has run (here: chips / 4, at least 1).
  """
  parts = text.strip().lower().split(":")
  if len(parts) != 3 or not all(parts):
    raise _bad(text, f"expected PLATFORM:MODEL:TOPOLOGY ({EXAMPLES})")
  platform, model, topology = parts
  if platform == "tpu":
    if model not in TPU_CHIPS:
      raise _bad(text, f"unknown TPU type {model!r} (known: {', '.join(sorted(TPU_CHIPS))})")
    chips = math.prod(_dims(text, topology, TPU_DIMS[model]))
    per_chip = 2 if model == "v4" else 1
    return _make(text, platform, model, topology, chips * per_chip, max(1, chips // 4), TPU_CHIPS[model])
  if platform == "gpu":
    if model not in GPU_CHIPS:
      raise _bad(text, f"unknown GPU model {model!r} (known: {', '.join(sorted(GPU_CHIPS))})")
    dims = _dims(text, topology, None)
    if len(dims) > 2:
      raise _bad(text, f"GPU topology {topology!r} is N or NxHOSTS (N GPUs on each of HOSTS hosts)")
    per_host, hosts = dims[0], dims[1] if len(dims) == 2 else 1
    if per_host > MAX_GPUS_PER_HOST:
      raise _bad(text, f"{per_host} GPUs per host; at most {MAX_GPUS_PER_HOST} (give NxHOSTS, e.g. 8x{per_host // 8})")
    return _make(text, platform, model, f"{per_host}x{hosts}", per_host * hosts, hosts, GPU_CHIPS[model])
  raise _bad(text, f"unknown platform {platform!r} (known: gpu, tpu)")
