"""The command line: `--help` lists every key, `--config=FILE.py[:ARG]` config files, both override
forms and their parsing, and no process-wide hook from importing the library. In-process, no
training: `cli.run` is called with a mode that records the config it gets."""

import subprocess
import sys
import textwrap

import pytest

from multimodal_jax import cli
from multimodal_jax.avdcnn import config as avdcnn_config
from multimodal_jax.avdcnn import run as avdcnn_run
from multimodal_jax.clip import config as clip_config
from multimodal_jax.clip import run as clip_run
from multimodal_jax.config import flat_keys, show_value
from multimodal_jax.fusion import config as fusion_config
from multimodal_jax.fusion import run as fusion_run
from multimodal_jax.latent_diffusion import config as ld_config
from multimodal_jax.latent_diffusion import run as ld_run

METHODS = {
  "fusion": (fusion_config, fusion_run),
  "clip": (clip_config, clip_run),
  "latent_diffusion": (ld_config, ld_run),
  "avdcnn": (avdcnn_config, avdcnn_run),
}


def _run(argv, tmp_path, method=clip_config):
  """`cli.run` of `method`'s config with a fake train mode; returns (exit status, the config it got)."""
  seen = {}
  modes = {"train": lambda config, workdir: seen.update(config=config), "eval": lambda config, workdir: None}
  argv = ["--workdir", str(tmp_path / "run"), "--config.compile_cache=off", *argv]
  code = cli.run(method.get_config, modes, argv, rules=method.RULES, eval_keys=method.EVAL_KEYS)
  return code, seen.get("config")


def _error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


# Catches a key that `--help` leaves out (a nested `autoencoder.` key not flattened, a key declared
# outside KEYS) or shows with another default, and `--help` that needs --workdir or exits non-zero.
@pytest.mark.parametrize("name", list(METHODS))
def test_help_lists_every_key_with_its_default(name, capsys):
  config_module, run_module = METHODS[name]
  assert run_module.main(["--help"]) == 0
  out = capsys.readouterr().out
  for key, value in flat_keys(config_module.get_config()).items():
    assert f"--config.{key}={show_value(value)}\n" in out, key
  assert "modes:" in out and "Expected " in out


# Catches defaults shown in a form the command line does not read back (True, 2e-3 as 0.002 kept).
def test_help_shows_defaults_as_typed(capsys):
  assert clip_run.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "--config.remat=none\n" in out and "--config.templates=''\n" in out
  assert ld_run.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "--config.autoencoder.steps=600\n" in out and "--config.denoiser.ema_decay=0.995\n" in out
  assert "autoencoder: stage 1" in out and "denoiser: stage 2" in out  # the stage sections explained


# Catches a config file that replaces the base config instead of being merged, or overrides applied
# before the file (the file would win over the command line).
def test_config_file_then_overrides(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text(
    textwrap.dedent("""
      import ml_collections

      def get_config():
        c = ml_collections.ConfigDict()
        c.steps = 11
        c.loss = "sigmoid"
        c.warmup_steps = 5
        return c
    """)
  )
  code, config = _run([f"--config={path}", "--config.warmup_steps=3"], tmp_path)
  assert code == 0
  assert (config.steps, config.loss, config.warmup_steps) == (11, "sigmoid", 3)
  assert config.batch_size == clip_config.get_config().batch_size  # keys the file does not set keep their defaults


# Catches `:ARG` not passed to get_config(arg), and an integral float in a file left a float for an int key.
def test_config_file_with_argument(tmp_path):
  path = tmp_path / "sized.py"
  path.write_text("def get_config(size):\n  return {'image_size': int(size), 'steps': 1e2}\n")
  code, config = _run(["--config", f"{path}:64"], tmp_path)
  assert code == 0 and config.image_size == 64 and config.steps == 100 and isinstance(config.steps, int)


# Catches a config file's unknown key or bad value reaching the run (or a traceback instead of one line).
@pytest.mark.parametrize(
  "body, expect",
  [
    ("def get_config():\n  return {'stepz': 3}\n", "unknown config key 'stepz'; did you mean steps"),
    ("def get_config():\n  return {'steps': -1}\n", "steps=-1: expected a number > 0"),
    ("def get_config():\n  return {'remat': 'yes'}\n", "remat=yes: expected none, full, dots or dots_no_batch"),
    ("def get_config(arg):\n  return {}\n", "add :ARG"),
    ("config = {}\n", "defines no get_config()"),
    ("def get_config(:\n", "line 1"),
  ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, body, expect):
  path = tmp_path / "bad.py"
  path.write_text(body)
  code, config = _run([f"--config={path}"], tmp_path)
  line = _error_line(capsys)
  assert code == 2 and config is None and line.startswith(f"error: --config={path}") and expect in line, line


# Catches `--config.KEY VALUE` (space form) read as a key without a value, or its value left a string.
def test_space_form_override(tmp_path):
  code, config = _run(["--config.steps", "7", "--config.seed", "-1", "--config.seed", "2"], tmp_path)
  assert code == 0 and config.steps == 7 and isinstance(config.steps, int) and config.seed == 2


# Catches a float parsed by int(), a bool parsed by bool("false") (True), or a bad bool accepted.
@pytest.mark.parametrize(
  "override, key, value",
  [
    ("learning_rate=1e-3", "learning_rate", 0.001),
    ("late_learn_weights=false", "late_learn_weights", False),
    ("late_learn_weights=0", "late_learn_weights", False),
    ("late_learn_weights=True", "late_learn_weights", True),
    ("augment_shift=0", "augment_shift", 0),
    ("remat=dots", "remat", "dots"),
  ],
)
def test_override_parses_to_the_keys_type(tmp_path, override, key, value):
  method = fusion_config if key == "late_learn_weights" else clip_config
  code, config = _run([f"--config.{override}"], tmp_path, method)
  assert code == 0 and config[key] == value and type(config[key]) is type(value)


# Catches a bad bool (or a float for an int) turned into a value instead of a one-line error.
@pytest.mark.parametrize(
  "override, expect",
  [
    ("late_learn_weights=maybe", "expected true or false"),
    ("steps=7.5", "expected a int"),
    ("remat=true", "expected none, full, dots or dots_no_batch"),
  ],
)
def test_bad_override_is_one_line(tmp_path, capsys, override, expect):
  method = fusion_config if override.startswith("late") else clip_config
  code, config = _run([f"--config.{override}"], tmp_path, method)
  line = _error_line(capsys)
  assert code == 2 and config is None and line == f"error: --config.{override}: {expect}"


# Catches a `--config.KEY` at the end of the line swallowed silently instead of reported.
def test_override_without_value_is_one_line(tmp_path, capsys):
  code, _ = _run(["--config.steps"], tmp_path)
  assert code == 2 and _error_line(capsys) == "error: --config.steps: expected --config.KEY=VALUE"


# Catches `--help` handling that dropped the required --workdir for the runs themselves.
def test_workdir_still_required(capsys):
  with pytest.raises(SystemExit) as done:
    fusion_run.main(["--mode=train"])
  assert done.value.code == 2 and "required: --workdir" in capsys.readouterr().err


# Catches a library import (or a checkpoint save / restore from a notebook) replacing the process's
# sys.unraisablehook / threading.excepthook or adding logging filters: only the command line may.
@pytest.mark.slow
def test_checkpoint_import_and_use_leave_process_hooks(tmp_path):
  code = textwrap.dedent(f"""
    import logging, sys, threading
    def mine(unraisable):
      pass
    sys.unraisablehook = mine
    thread_hook = threading.excepthook
    import numpy as np
    import jax
    import multimodal_jax.checkpoint as ckpt
    checkpointer = ckpt.Checkpointer({str(tmp_path)!r}, async_save=False)
    checkpointer.save(1, {{"params": {{"w": np.ones(3, np.float32)}}}}, config={{"steps": 1}})
    checkpointer.wait()
    checkpointer.close()
    abstract = {{"w": jax.ShapeDtypeStruct((3,), np.float32)}}
    ckpt.restore_params({str(tmp_path)!r}, abstract)
    assert sys.unraisablehook is mine, sys.unraisablehook
    assert threading.excepthook is thread_hook, threading.excepthook
    assert not logging.getLogger("absl").filters and not logging.getLogger("asyncio").filters
    print("ok")
  """)
  done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_tcmalloc_is_added_to_the_preload_list_once_and_never_against_the_users_choice(monkeypatch):
  # catches a launcher (or the test session, conftest.py) that drops the caller's own LD_PRELOAD, preloads
  # tcmalloc twice, or ignores MMJ_NO_TCMALLOC
  from multimodal_jax import launch

  monkeypatch.setattr(launch.os.path, "exists", lambda path: path == launch.TCMALLOC)
  env = launch.with_tcmalloc({"LD_PRELOAD": "/opt/libmine.so", "HOME": "/h"})
  assert env == {"LD_PRELOAD": f"{launch.TCMALLOC}:/opt/libmine.so", "HOME": "/h"}
  assert launch.with_tcmalloc({}) == {"LD_PRELOAD": launch.TCMALLOC}
  assert launch.with_tcmalloc(env) is None
  assert launch.with_tcmalloc({"MMJ_NO_TCMALLOC": "1"}) is None
  monkeypatch.setattr(launch.os.path, "exists", lambda path: False)  # not installed: nothing to preload
  assert launch.with_tcmalloc({}) is None
