"""FLOPs of compiled steps against the analytic count, the peak table, MFU, profiler windows and the
compilation cache setting."""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from multimodal_jax import profiling, train
from multimodal_jax import sharding as shd
from multimodal_jax.clip import losses
from multimodal_jax.clip import model as clip

BATCH = 8


def _analytic_train_flops(cfg: clip.ClipConfig, batch: int) -> float:
  """3x the forward matmul FLOPs of a CLIP ViT + text Transformer step (attention matmuls included)."""
  v, t = cfg.vision, cfg.text

  def tower(length, width, layers, mlp_ratio):
    hidden = int(width * mlp_ratio)
    per_layer = 2 * length * (4 * width * width + 2 * width * hidden) + 2 * 2 * length * length * width
    return layers * per_layer + 2 * width * cfg.embed_dim

  patches = (v.image_size // v.patch_size) ** 2
  patch_embed = 2 * patches * v.patch_size**2 * v.channels * v.width
  forward = tower(patches + 1, v.width, v.layers, v.mlp_ratio) + tower(t.context_length, t.width, t.layers, t.mlp_ratio)
  return 3 * batch * (forward + patch_embed)


def _lowered_clip_step(unroll):
  cfg = dataclasses.replace(clip.PRESETS["tiny"], scan_unroll=unroll)
  model = clip.CLIP(cfg)
  mesh = shd.make_mesh("data:1", jax.devices()[:1])
  images = jnp.zeros((BATCH, 32, 32, 3))
  tokens = jnp.ones((BATCH, cfg.text.context_length), jnp.int32)

  def init_params(rng):
    return model.init({"params": rng}, images[:1], tokens[:1])["params"]

  def loss_fn(params, batch, rng):
    img, txt, scale, _ = model.apply({"params": params}, batch["image"], batch["text"])
    return losses.clip_softmax_loss(img, txt, scale), {}

  tx = optax.adamw(1e-3)
  abstract, shardings = train.abstract_train_state(init_params, tx, mesh)
  step = train.make_train_step(loss_fn, tx, mesh, shardings)
  batch = {
    "image": jax.ShapeDtypeStruct(images.shape, images.dtype),
    "text": jax.ShapeDtypeStruct(tokens.shape, tokens.dtype),
  }
  return cfg, step.lower(abstract, batch)


@pytest.fixture(scope="module")
def clip_steps():
  return {"unrolled": _lowered_clip_step(True), "rolled": _lowered_clip_step(1)}  # (True == 1 as dict keys)


@pytest.mark.slow  # ~30 s each under load: compiles of two CLIP steps (clip_steps)
def test_cost_analysis_of_the_unrolled_clip_step_matches_the_analytic_count(clip_steps):
  cfg, lowered = clip_steps["unrolled"]
  analytic = _analytic_train_flops(cfg, BATCH)
  xla = profiling.cost_analysis_flops(lowered.compile())
  assert xla == pytest.approx(analytic, rel=0.10)


@pytest.mark.slow
def test_step_flops_counts_every_trip_of_a_rolled_scan(clip_steps):
  cfg, lowered = clip_steps["rolled"]
  analytic = _analytic_train_flops(cfg, BATCH)
  counted = profiling.step_flops(lowered)
  assert counted == pytest.approx(analytic, rel=0.10)
  # XLA's own analysis sees one trip of the 4-layer loops, so it falls far short here
  assert profiling.cost_analysis_flops(lowered.compile()) < 0.6 * analytic
  # and the count is the same whatever the unroll
  assert profiling.step_flops(clip_steps["unrolled"][1]) == pytest.approx(counted, rel=1e-6)


def test_hlo_matmul_flops_of_a_dot_a_convolution_and_a_loop():
  def f(x, w, k, img):
    y = jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ w), x)  # 5 x [4, 16] @ [16, 16]
    conv = jax.lax.conv_general_dilated(img, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.sum() + conv.sum()

  args = (jnp.ones((4, 16)), jnp.ones((16, 16)), jnp.ones((3, 3, 2, 8)), jnp.ones((1, 9, 9, 2)))
  lowered = jax.jit(f).lower(*args)
  expected = 5 * 2 * 4 * 16 * 16 + 2 * (4 * 4 * 8) * (3 * 3 * 2)
  assert profiling.step_flops(lowered) == expected
  assert profiling.hlo_matmul_flops("no module here") == 0.0


def test_peak_table_and_mfu():
  assert profiling.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert profiling.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert profiling.peak_flops("NVIDIA H200", "float32") == 494e12
  assert profiling.peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
  assert profiling.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert profiling.peak_flops("TPU v5", "bfloat16") == 459e12
  assert profiling.peak_flops("TPU v6 lite", "bfloat16") == 918e12
  assert profiling.peak_flops("TPU v4", "float32") == 275e12
  assert profiling.peak_flops("cpu", "float32") is None
  m = profiling.throughput_metrics(989e12, 2.0, 4, "NVIDIA H100 80GB HBM3", "bfloat16")
  assert m["tflops_per_sec_per_device"] == pytest.approx(494.5)
  assert m["mfu"] == pytest.approx(0.5)
  assert "mfu" not in profiling.throughput_metrics(1e9, 1.0, 1, "cpu", "float32")
  assert profiling.throughput_metrics(None, 1.0, 1, "cpu", "float32") == {}


def test_profile_steps_spec():
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps("5:8") == (5, 8)
  for bad in ("5", "8:5", "a:b", "-1:3"):
    with pytest.raises(ValueError, match="START:END"):
      profiling.parse_profile_steps(bad)


def test_profile_window_writes_a_trace_for_its_steps_only(tmp_path):
  logdir = tmp_path / "profile"
  window = profiling.ProfileWindow("2:4", str(logdir))
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((32, 32))
  for step in range(6):
    window.before(step)
    assert window.active == (2 <= step < 4)
    x = f(x) / 32
    window.after(step, x)
    assert not logdir.exists() or step >= 2
  assert not window.active
  traces = [os.path.join(d, n) for d, _, names in os.walk(logdir) for n in names]
  assert any(n.endswith((".xplane.pb", ".trace.json.gz")) for n in traces), traces


def test_compile_cache_setting(tmp_path, monkeypatch):
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {k: getattr(jax.config, k) for k in keys}
  saved["jax_persistent_cache_min_entry_size_bytes"] = jax.config.jax_persistent_cache_min_entry_size_bytes
  monkeypatch.delenv(profiling.CACHE_ENV, raising=False)  # the session's (tests/conftest.py) is tested below
  try:
    assert profiling.setup_compile_cache("off") is None
    assert jax.config.jax_compilation_cache_dir == saved["jax_compilation_cache_dir"]  # "off" changes nothing
    path = profiling.setup_compile_cache(str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert profiling.default_cache_dir() == str(tmp_path / "xdg" / "multimodal_jax" / "jax_cache")
    # catches a $MMJ_COMPILE_CACHE that is ignored (a harness's runs land in the user's cache) or that
    # overrides an explicit setting: it is the default only
    monkeypatch.setenv(profiling.CACHE_ENV, str(tmp_path / "env"))
    assert profiling.setup_compile_cache("") == str(tmp_path / "env") == jax.config.jax_compilation_cache_dir
    assert profiling.setup_compile_cache(str(tmp_path / "cache")) == jax.config.jax_compilation_cache_dir == path
    monkeypatch.setenv(profiling.CACHE_ENV, "off")
    assert profiling.setup_compile_cache("") is None and jax.config.jax_compilation_cache_dir == path
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
  np.testing.assert_equal(jax.config.jax_compilation_cache_dir, saved["jax_compilation_cache_dir"])


def test_the_session_compiles_into_a_cache_of_its_own_not_the_users():
  # catches a suite that reads and writes the user's ~/.cache/multimodal_jax (or the caller's
  # JAX_COMPILATION_CACHE_DIR), or that turns the cache on only once the first experiment runs
  session = os.environ[profiling.CACHE_ENV]  # set by tests/conftest.py
  if session == "off":
    assert jax.config.jax_compilation_cache_dir is None
    return
  assert jax.config.jax_compilation_cache_dir == session
  assert not os.path.realpath(session).startswith(os.path.realpath(profiling.default_cache_dir()))
  # a program no earlier session compiled (its constant is new) is written there
  constant = float(time.time_ns() % 1_000_003) + 0.5
  before = set(os.listdir(session))
  jax.block_until_ready(jax.jit(lambda x: x * constant)(jnp.arange(5.0)))
  assert set(os.listdir(session)) - before


def test_accelerator_check_summary_of_a_run():
  from benchmarks import accelerator_check as ac

  records = [{"step": s, "loss": 3.0 - 0.01 * s, "examples_per_sec": 100.0 + s % 3, "mfu": 0.4} for s in range(1, 51)]
  records[0]["examples_per_sec"] = 1.0  # the first logged step includes compilation
  summary = ac.summarize(records)
  assert summary["loss_fell"] and summary["loss_last"] < summary["loss_first"]
  assert summary["examples_per_sec"] == pytest.approx(101.0)
  assert summary["mfu"] == pytest.approx(0.4) and summary["peak_memory_gib"] is None
  assert not ac.summarize([{"step": s, "loss": 1.0 + s} for s in range(10)])["loss_fell"]
  assert ac.overrides("clip", 200) == ["--config.dtype=bfloat16", "--config.steps=200"]


@pytest.mark.slow
def test_fit_logs_tflops_and_writes_a_profile_for_its_window(tmp_path):
  import json

  from multimodal_jax import loop
  from multimodal_jax.data.pipeline import GrainBatches
  from tests import toy

  config = loop.base_config(steps=8, batch_size=32, seed=3, log_every=2, checkpoint_every=8, profile_steps="3:5")
  tx, schedule = toy.optimizer()
  loop.fit(
    workdir=str(tmp_path),
    config=config,
    mesh=shd.make_mesh("data:4,fsdp:2"),
    loss_fn=toy.loss_fn,
    init_params=toy.init_params,
    tx=tx,
    train_data=GrainBatches(toy.ToySource(), 32, seed=3),
    learning_rate_fn=schedule,
  )
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  # MLP 16 -> 32 -> 4 on 32 rows: forward, both weight gradients and the hidden layer's input gradient
  flops = 2 * 32 * (16 * 32 + 32 * 4) + 2 * 32 * 16 * 32 + 2 * 2 * 32 * 32 * 4
  for r in records[1:]:
    assert r["tflops_per_sec_per_device"] * 1e12 == pytest.approx(flops * r["examples_per_sec"] / 32 / 8, rel=1e-6)
    assert "mfu" not in r  # no peak for a CPU
  traces = [n for _, _, names in os.walk(tmp_path / "profile") for n in names]
  assert any(n.endswith(".xplane.pb") for n in traces), traces
  rule = loop.base_rules()["profile_steps"]
  assert rule.test("5:8") and rule.test("") and not rule.test("8:5")
