"""--mode=plan: the experiments' own steps compiled for TPU and GPU targets without the device
(`multimodal_jax.planning`, `multimodal_jax.targets`). Skipped with the reason when the `plan` extra's
compilers are not installed."""

import importlib.util
import json
import os

import pytest

from multimodal_jax import loop, planning
from multimodal_jax.config import MAX_BATCH, apply_overrides

HAVE_TPU = importlib.util.find_spec("libtpu") is not None
HAVE_GPU = importlib.util.find_spec("jax_plugins") is not None and importlib.util.find_spec("jax_cuda12_plugin")
needs_tpu = pytest.mark.skipif(not HAVE_TPU, reason='libtpu is not installed (pip install -e ".[plan]")')
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason='the CUDA plugin is not installed (pip install -e ".[plan]")')

REQUIRED = (
  "target", "devices", "device_kind", "batch_size", "hbm_gib", "peak_gib", "fits", "reserve_gib", "state_gib",
  "compute_dtype", "attention", "bf16_flop_fraction", "tflops_per_device", "collective_gib", "step_s_lower_bound",
  "compile_s",
)  # fmt: skip


def _plan(capsys, module, workdir, *args):
  status = module.main(["--workdir", str(workdir), "--mode=plan", *args])
  out, err = capsys.readouterr()
  return status, out.strip().splitlines(), err.strip().splitlines()


def test_resolve_dtype_per_platform():
  # Catches dtype=auto resolving the same everywhere (bfloat16 on a CPU would slow every CPU run).
  assert loop.resolve_dtype("auto", "cpu") == "float32"
  assert loop.resolve_dtype("auto", "gpu") == "bfloat16" and loop.resolve_dtype("auto", "tpu") == "bfloat16"
  assert loop.resolve_dtype("float32", "tpu") == "float32"  # an explicit choice is kept


def test_batch_size_max_parses_and_training_refuses_it(capsys, tmp_path):
  # Catches "max" reaching a training run (a -1 batch) instead of one line that says it is for --mode=plan.
  from multimodal_jax.fusion import config as fusion_config
  from multimodal_jax.fusion import run as fusion_run

  assert apply_overrides(fusion_config.get_config(), ["batch_size=max"]).batch_size == MAX_BATCH
  status = fusion_run.main(["--workdir", str(tmp_path / "w"), "--config.batch_size=max"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "batch_size=max is for --mode=plan" in err[0], err
  assert not os.path.exists(tmp_path / "w")


def test_float16_is_refused_in_one_line(capsys, tmp_path):
  # Catches float16 training without loss scaling (gradients underflow silently).
  from multimodal_jax.fusion import run as fusion_run

  status = fusion_run.main(["--workdir", str(tmp_path / "w"), "--config.dtype=float16"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "loss scaling" in err[0], err


@needs_tpu
def test_bad_target_is_one_line(capsys, tmp_path):
  # Catches an unknown TPU type reaching libtpu (a C++ error page) or a traceback.
  from multimodal_jax.fusion import run as fusion_run

  status, _, err = _plan(capsys, fusion_run, tmp_path, "--config.target=tpu:v9z:2x2")
  assert status == 2 and len(err) == 1 and "unknown TPU type" in err[0] and "v9z" in err[0], err


def test_largest_batch_brackets_the_budget():
  # Catches a search that returns a batch that does not fit, or one whose next multiple would still fit.
  def compile_at(batch):  # peak linear in the batch plus a kink, like a real step's temporaries
    peak = 1.5 + 0.013 * batch + (0.002 * batch if batch > 2000 else 0)
    return {"batch_size": batch, "peak_gib": peak, "fits": peak <= 72.0, "hbm_gib": 80.0, "reserve_gib": 8.0}

  for unit in (8, 24, 64):
    best, plans = planning.largest_batch(compile_at, unit, start=unit * 8)
    assert best % unit == 0 and compile_at(best)["fits"] and not compile_at(best + unit)["fits"]
    assert not compile_at(2 * best)["fits"] and len(plans) <= 10


@pytest.mark.slow
@needs_tpu
def test_fusion_plan_for_tpu_writes_the_plan(capsys, tmp_path):
  # Catches a plan that is not the compiled step's (peak from another formula), a missing field, files not written,
  # or dtype=auto not resolving to bfloat16 on a TPU.
  from multimodal_jax.fusion import run as fusion_run

  status, out, err = _plan(capsys, fusion_run, tmp_path, "--config.target=tpu:v5e:2x4", "--config.mesh=data:4,fsdp:2")
  assert status == 0, err
  plan = json.loads(out[-1])
  assert all(k in plan for k in REQUIRED), [k for k in REQUIRED if k not in plan]
  assert plan["target"] == "tpu:v5e:2x4" and plan["devices"] == 8 and plan["batch_size"] == 64
  assert plan["compute_dtype"] == "bfloat16" and plan["bf16_flop_fraction"] >= 0.95
  assert plan["peak_gib"] == pytest.approx(
    plan["state_gib"] + plan["output_gib"] - plan["alias_gib"] + plan["temp_gib"]
  )
  assert plan["fits"] == (plan["peak_gib"] <= plan["hbm_gib"] - plan["reserve_gib"])
  assert json.loads((tmp_path / "plan" / "tpu_v5e_2x4.json").read_text()) == json.loads(json.dumps(plan))
  assert "HloModule" in (tmp_path / "plan" / "tpu_v5e_2x4.hlo.txt").read_text()


@pytest.mark.slow
@needs_gpu
def test_clip_plan_for_h100_uses_cudnn_attention_in_bf16(capsys, tmp_path):
  # Catches attention chosen from the default backend (cpu) instead of the mesh's devices, float32 attention inputs
  # in a bfloat16 step (cuDNN refuses them), and float32 matmuls in the towers.
  from multimodal_jax.clip import run as clip_run

  args = ["--config.target=gpu:h100:8", "--config.mesh=fsdp:8", "--config.image_tower=vit", "--config.batch_size=32"]
  status, out, err = _plan(capsys, clip_run, tmp_path, *args)
  assert status == 0, err
  plan = json.loads(out[-1])
  assert plan["attention"] == "cudnn" and plan["bf16_flop_fraction"] >= 0.95, plan
  assert "__cudnn$fmha" in (tmp_path / "plan" / "gpu_h100_8.hlo.txt").read_text()


@pytest.mark.slow
@needs_gpu
def test_batch_size_max_fits_and_one_more_step_does_not(capsys, tmp_path, monkeypatch):
  # Catches a search whose answer does not fit, that stopped before the next multiple of the unit was refused (an
  # early stop), that skipped a larger batch it had seen fit, or an answer that is not a multiple of the devices.
  # A 40 MiB H100 keeps the search to small batches of the tiny AVDCNN (five compiles on 2 cores).
  import dataclasses
  import re

  from multimodal_jax import targets
  from multimodal_jax.avdcnn import run as avdcnn_run

  real = targets.parse_target

  def small(text):
    target = real(text)
    return dataclasses.replace(target, hbm_bytes=40 * 2**20, reserve_bytes=0)

  monkeypatch.setattr(targets, "parse_target", small)
  common = ["--config.target=gpu:h100:8", "--config.model=tiny", "--config.mesh=data:8"]
  status, out, err = _plan(capsys, avdcnn_run, tmp_path, *common, "--config.batch_size=max")
  assert status == 0, err
  plan = json.loads(out[-1])
  best = plan["batch_size"]
  assert best % 8 == 0 and best > 0 and plan["fits"], plan
  probed = re.findall(r"batch (\d+): peak \S+ GiB, fits (True|False)", "\n".join(err))
  probes = {int(batch): fits == "True" for batch, fits in probed}
  assert probes[best] and probes.get(best + 8) is False, probes  # the next multiple was compiled and refused
  assert all(fits == (batch <= best) for batch, fits in probes.items()), probes
