"""No tensor is replicated and re-partitioned behind our back: the train steps of CLIP, DiT, fusion and
AVDCNN (tiny presets) compile on data, fsdp and tensor meshes without XLA's "Involuntary full
rematerialization" warning.

XLA logs that warning from C++ straight to file descriptor 2, so the compiles run in a subprocess
(`python -m tests.test_resharding`) whose stderr the test reads. Its environment is built here, not
inherited: a caller's TF_CPP_MIN_LOG_LEVEL=2 hides the warning, and a persistent compilation cache
that holds a step skips the compile that would log it, so either would let the test pass unseen.
The subprocess compiles a positive control first (a program that must reshard the hard way), so a
warning that cannot reach the test, or a compile that did not happen, fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.xla_flags import QUICK_COMPILE_ENV, xla_flags

MESHES = ("data:8", "data:4,fsdp:2", "data:2,fsdp:2,tensor:2")
WARNING = "Involuntary full rematerialization"
BATCH = 128  # the warning of the CLIP text tower (fixed) showed at 128, not at 16


def _compile(name, init_params, loss_fn_for, batch_shapes, spec):
  import jax
  import optax

  from multimodal_jax import sharding as shd
  from multimodal_jax import train

  mesh = shd.make_mesh(spec)
  tx = optax.adamw(1e-3)
  abstract, shardings = train.abstract_train_state(init_params, tx, mesh)
  step = train.make_train_step(loss_fn_for(mesh), tx, mesh, shardings)
  batch = {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
    for k, (shape, dtype) in batch_shapes.items()
  }
  print(f"=== {name} on {spec}", file=sys.stderr, flush=True)
  step.lower(abstract, batch).compile()
  print("=== done", file=sys.stderr, flush=True)


def _clip(image_tower):
  """The CLIP experiment's default step (tiny model, 32x32 grey images, 16 word tokens, the gathered
  softmax loss over the batch axes), built from the library so it does not follow the CLI's churn."""
  import dataclasses

  import jax.numpy as jnp

  from multimodal_jax import sharding as shd
  from multimodal_jax.clip import losses
  from multimodal_jax.clip import model as clip_model

  base = clip_model.PRESETS["tiny"]
  cfg = dataclasses.replace(
    base, vision=dataclasses.replace(base.vision, tower=image_tower, channels=1), text=base.text
  )
  model = clip_model.CLIP(cfg)
  context = cfg.text.context_length
  shapes = {"image": ((BATCH, 32, 32, 1), jnp.uint8), "text": ((BATCH, context), jnp.int32)}

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, 32, 32, 1)), jnp.ones((1, context), jnp.int32))["params"]

  def loss_fn_for(mesh):
    def loss_fn(params, batch, rng):
      del rng
      img, txt, scale, _ = model.apply({"params": params}, batch["image"].astype(jnp.float32) / 255.0, batch["text"])
      return losses.clip_softmax_loss_gathered(img, txt, scale, mesh, shd.BATCH_AXES), {}

    return loss_fn

  return init_params, loss_fn_for, shapes


def _dit():
  import jax
  import jax.numpy as jnp

  from multimodal_jax.latent_diffusion import diffusion, dit

  model = dit.DiT(dit.dit_config("tiny"))
  schedule = diffusion.make_schedule()
  shapes = {"x": ((BATCH, 8, 8, 4), jnp.float32), "context": ((BATCH, 6, 128), jnp.float32), "mask": ((BATCH, 6), bool)}

  def init_params(rng):
    args = [jnp.zeros((1, *s[1:]), d) for s, d in shapes.values()]
    return model.init({"params": rng}, args[0], jnp.zeros((1,), jnp.int32), args[1], args[2])["params"]

  def loss_fn(params, batch, rng):
    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, batch["context"], batch["mask"])

    return diffusion.diffusion_loss(model_fn, schedule, batch["x"], jax.random.fold_in(rng, 0))

  return init_params, lambda mesh: loss_fn, shapes


def _fusion():
  import jax.numpy as jnp
  import numpy as np

  from multimodal_jax.datasets import av_digits
  from multimodal_jax.fusion import config as fusion_config
  from multimodal_jax.fusion import losses as fusion_losses
  from multimodal_jax.fusion import model as fusion_model

  config = fusion_config.get_config()
  model = fusion_model.build_model(config)
  record = {
    "image": np.zeros((28, 28, 1), np.uint8),
    "audio": np.zeros((av_digits.AUDIO_FRAMES, av_digits.MEL_BINS), np.float32),
    "label": np.int64(0),
  }
  shapes = {k: ((BATCH, *np.shape(v)), jnp.asarray(v).dtype) for k, v in record.items()}
  return (
    fusion_model.make_init_params(model, [record], config),
    lambda mesh: fusion_losses.make_loss_fn(model, config),
    shapes,
  )


def _avdcnn():
  import jax.numpy as jnp

  from multimodal_jax.avdcnn import losses as avdcnn_losses
  from multimodal_jax.avdcnn import model as avdcnn

  model = avdcnn.AVDCNN(avdcnn.PRESETS["tiny"])
  bins, frames = avdcnn.BINS, avdcnn.CONTEXT
  shapes = {
    "audio": ((BATCH, bins, frames), jnp.float32),
    "lips": ((BATCH, frames, *avdcnn.LIPS_SHAPE), jnp.uint8),
    **{k: ((BATCH, bins), jnp.float32) for k in ("target", "mean", "std")},
  }
  return avdcnn.make_init_params(model), lambda mesh: avdcnn_losses.make_loss_fn(model, 1.0, loss="compressed"), shapes


def _control():
  """The positive control: a program XLA's SPMD partitioner can only reshard by full rematerialization:
  an add laid out `P("y", None, "x")` on a 4x2 mesh, constrained to `P(None, ("x", "y"), None)`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
  before, after = NamedSharding(mesh, P("y", None, "x")), NamedSharding(mesh, P(None, ("x", "y"), None))

  def f(a, b, c):
    return c + jax.lax.with_sharding_constraint(a + b, after)

  x = jax.ShapeDtypeStruct((16, 16, 16), jnp.float32)
  print(f"=== {CONTROL} on x:4,y:2", file=sys.stderr, flush=True)
  jax.jit(f, in_shardings=(before, before, after), out_shardings=after).lower(x, x, x).compile()
  print("=== done", file=sys.stderr, flush=True)


CONTROL = "control"
STEPS = {"clip_vit": lambda: _clip("vit"), "clip_resnet": lambda: _clip("resnet"), "dit": _dit}
STEPS |= {"fusion": _fusion, "avdcnn": _avdcnn}
# Kept from the caller's environment: what finds Python, its packages, its allocator and a temp dir. Everything else
# (XLA_FLAGS, TF_CPP_* log levels, JAX_* settings such as JAX_COMPILATION_CACHE_DIR, MMJ_*) is set below.
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD", "TMPDIR")


def clean_env() -> dict[str, str]:
  """The subprocess's environment, built explicitly: 8 CPU devices, every C++ log level shown, no
  persistent compilation cache (JAX's and ours off)."""
  env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
  # -O0 as everywhere in the tests: the warning comes from the SPMD partitioner, an HLO pass that runs either way.
  env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8), **QUICK_COMPILE_ENV}
  env |= {"TF_CPP_MIN_LOG_LEVEL": "0", "JAX_ENABLE_COMPILATION_CACHE": "false", "MMJ_COMPILE_CACHE": "off"}
  return env


def _warnings_by_step(stderr: str) -> dict[str, list[str]]:
  found: dict[str, list[str]] = {}
  current = "(before the first compile)"
  for line in stderr.splitlines():
    if line.startswith("=== ") and line != "=== done":
      current = line[4:]
    elif WARNING in line:
      found.setdefault(current, []).append(line.strip()[:300])
  return found


def _python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, check=False)


def _run_subprocess(*steps: str) -> subprocess.CompletedProcess:
  """`python -m tests.test_resharding STEP...` (all steps, the control first, by default) in `clean_env()`."""
  return _python(["-m", "tests.test_resharding", *steps], clean_env())


def _check_fresh_and_flagged(proc: subprocess.CompletedProcess) -> dict[str, list[str]]:
  """Asserts the subprocess compiled with no persistent cache and that the control was flagged; returns
  the warnings of the other compiles."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  # catches a subprocess that inherits a compilation cache: a cached step is loaded, not compiled, and logs nothing
  assert "=== cache off" in proc.stderr.splitlines(), proc.stderr[-3000:]
  found = _warnings_by_step(proc.stderr)
  control = f"{CONTROL} on x:4,y:2"
  # catches a detector that cannot see the warning (a log level that hides it, stderr not read, a
  # changed message) or a control served from a cache: then no step's warning would be seen either
  assert control in found, proc.stderr[-3000:]
  del found[control]
  return found


@pytest.mark.slow
def test_the_control_is_compiled_and_flagged_even_where_the_callers_environment_would_hide_it(tmp_path, monkeypatch):
  # catches a subprocess environment inherited from the caller: a warm persistent cache there holds the
  # control (so it would load, not compile) and TF_CPP_MIN_LOG_LEVEL=2 drops warnings, yet it must be flagged
  cached = {"JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
  cached["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  warm = ["-c", "from tests.test_resharding import _control; _control()"]
  runs = [_python(warm, clean_env() | cached) for _ in range(2)]
  assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-3000:]
  # the hazard is real: compiled once, flagged; loaded from the cache the second time, silent
  assert [WARNING in r.stderr for r in runs] == [True, False], [r.stderr[-1000:] for r in runs]
  for key, value in (cached | {"TF_CPP_MIN_LOG_LEVEL": "2"}).items():
    monkeypatch.setenv(key, value)
  assert not _check_fresh_and_flagged(_run_subprocess(CONTROL))


@pytest.mark.slow  # 15 compiles in a subprocess: 100 s beside another pytest worker on 2 Zen 3 cores
def test_train_steps_compile_without_involuntary_rematerialization():
  proc = _run_subprocess()
  found = _check_fresh_and_flagged(proc)
  compiled = [line for line in proc.stderr.splitlines() if line.startswith("=== ") and line[4:].split()[0] in STEPS]
  assert len(compiled) == len(STEPS) * len(MESHES), compiled
  assert proc.stderr.count("=== done") == len(compiled) + 1  # and the control's
  assert not found, "\n".join(f"{step}: {lines[0]}" for step, lines in found.items())


def test_the_scan_of_stderr_finds_the_warning():
  stderr = (
    f"=== dit on data:8\nW0000 spmd_partitioner.cc:1 {WARNING} of f32[16,16,128]\n=== done\n=== fusion on data:8\n"
  )
  assert list(_warnings_by_step(stderr)) == ["dit on data:8"]


def test_constrain_names_activations_through_the_rules_under_the_step_mesh_only():
  import jax
  import jax.numpy as jnp

  from multimodal_jax import sharding as shd

  x = jnp.ones((8, 4, 6))
  axes = ("activation_batch", "activation_length", "activation_embed")
  assert shd.constrain(x, axes) is x  # no mesh: nothing to constrain to
  mesh = shd.make_mesh("data:2,fsdp:2,tensor:2")
  assert shd.logical_to_spec(x.shape, axes, mesh.shape) == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  hidden = ("activation_batch", "activation_length", "activation_mlp")
  assert shd.logical_to_spec(x.shape, hidden, mesh.shape) == jax.sharding.PartitionSpec(
    ("data", "fsdp"), None, "tensor"
  )

  def f(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return shd.constrain(x * 2, hidden)

  text = jax.jit(f).lower(x).as_text()
  assert "sharding_constraint" in text and '{"data", "fsdp"}, {}, {"tensor"}' in text, text


if __name__ == "__main__":
  import jax

  # No persistent cache in this process, whatever the environment says: every program below is compiled.
  jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_compilation_cache_dir", None)
  print("=== cache off", file=sys.stderr, flush=True)
  only = sys.argv[1:] or [CONTROL, *STEPS]
  for step_name in only:
    if step_name == CONTROL:
      _control()
      continue
    parts = STEPS[step_name]()
    for mesh_spec in MESHES:
      _compile(step_name, *parts, mesh_spec)
