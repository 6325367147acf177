"""Bad input across the four experiments: every case ends in one line on stderr with a non-zero exit,
and the trained run in the workdir is untouched (the same directories and files, each with the same
bytes; the latest checkpoint still restores)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

from multimodal_jax import checkpoint, metrics
from multimodal_jax.avdcnn import run as avdcnn
from multimodal_jax.clip import run as clip
from multimodal_jax.files import atomic_write
from multimodal_jax.fusion import run as fusion
from multimodal_jax.latent_diffusion import run as ld
from tests import runs as session_runs

EXPERIMENTS = {"fusion": fusion, "clip": clip, "avdcnn": avdcnn, "latent_diffusion": ld}
TRAIN_ARGS = session_runs.TRAIN_ARGS  # the session's trained runs (tests/runs.py), which the cases below are given
# Every case needs trained runs and built data, so the table runs in the whole suite only; the fast subset keeps
# one bad-input test per experiment that needs neither (docs/testing.md).
FAST = ()


@pytest.fixture(scope="module")
def data_dirs(request):
  """The TFDS data dir of each experiment: the session's, with each dataset built only when a case of an
  experiment that reads it runs."""
  return lambda name: request.getfixturevalue(session_runs.DATA_FIXTURE[name])


@pytest.fixture(scope="module", name="runs")
def runs_fixture(trained_runs):
  """This module's copy of the session's trained run of each experiment, taken the first time a case needs it."""
  copied = {}

  def get(name):
    if name not in copied:
      copied[name] = trained_runs(name)
    return copied[name]

  return get


def _snapshot(root) -> dict[str, str]:
  """Every directory and file under `root`: relative path -> "dir", or the sha256 of the file's bytes.
  Nothing is left out: a bad input may not add, remove or rewrite anything, lock or temp files included."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(folder, d), root)] = "dir"
    for f in files:
      with open(os.path.join(folder, f), "rb") as fh:
        out[os.path.relpath(os.path.join(folder, f), root)] = hashlib.file_digest(fh, "sha256").hexdigest()
  return out


def _assert_unchanged(before: dict[str, str], root, what) -> None:
  after = _snapshot(root)
  changes = {
    "added": sorted(set(after) - set(before)),
    "removed": sorted(set(before) - set(after)),
    "rewritten": sorted(p for p in set(before) & set(after) if before[p] != after[p]),
  }
  assert after == before, f"{what} changed {root}: {changes}"


def _one_line_failure(capsys, name, argv):
  capsys.readouterr()
  status = EXPERIMENTS[name].main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert status != 0, f"exit status {status} for {argv}"
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def _wav(path, samples, rate=16000):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(np.asarray(samples, np.int16).tobytes())
  return path


# (experiment, arguments, a part of the expected message). {other} is another experiment's run,
# {empty} an empty directory, {file} a file, {tmp} a scratch directory, {wav0} a wav of 0 samples.
CASES = [
  ("fusion", ["--config.batch_size=0"], "--config.batch_size=0: expected a number > 0"),
  ("fusion", ["--config.batch_size=-8"], "--config.batch_size=-8"),
  ("fusion", ["--config.batch_size=abc"], "expected a int"),
  ("fusion", ["--config.batch_size=12"], "divisible by the 8 data-parallel devices"),
  ("fusion", ["--config.grad_accum_steps=0"], "--config.grad_accum_steps=0"),
  ("fusion", ["--config.grad_accum_steps=3"], "not divisible by grad_accum_steps=3"),
  ("fusion", ["--config.checkpoint_every=0"], "--config.checkpoint_every=0"),
  ("fusion", ["--config.log_every=0"], "--config.log_every=0"),
  ("fusion", ["--config.eval_every=-5"], "--config.eval_every=-5"),
  ("fusion", ["--config.steps=0"], "--config.steps=0"),
  ("fusion", ["--config.steps=-3"], "--config.steps=-3"),
  ("fusion", ["--config.dtype=fp7"], "--config.dtype=fp7: expected auto, float32 or bfloat16"),
  ("fusion", ["--config.keep_checkpoints=0"], "--config.keep_checkpoints=0"),
  ("fusion", ["--config.keep_checkpoints=-1"], "--config.keep_checkpoints=-1"),
  ("fusion", ["--config.learning_rate=nan"], "--config.learning_rate=nan"),
  ("fusion", ["--config.learning_rate=inf"], "--config.learning_rate=inf"),
  ("fusion", ["--config.ema_decay=1.5"], "--config.ema_decay=1.5"),
  ("fusion", ["--config.seed=-1"], "--config.seed=-1"),
  ("fusion", ["--config.mesh=data:3"], "data:3"),
  ("fusion", ["--config.mesh=pipeline:2"], "pipeline"),
  ("fusion", ["--config.fusion=middle"], "--config.fusion=middle: expected one of early"),
  ("fusion", ["--config.modalities=image,smell"], "--config.modalities=image,smell"),
  ("fusion", ["--config.modalities=,"], "--config.modalities=,"),
  ("fusion", ["--config.dropout=1.5"], "--config.dropout=1.5"),
  ("fusion", ["--config.late_learn_weights=maybe"], "expected true or false"),
  ("fusion", ["--config.stepz=3"], "unknown config key 'stepz'"),
  ("fusion", ["--config.steps"], "expected --config.KEY=VALUE"),
  ("fusion", ["--steps=3"], "unrecognised argument '--steps=3'"),
  ("fusion", ["--mode=eval", "--config.fusion=early"], "trained with fusion='joint'"),
  ("fusion", ["--mode=eval", "--config.features=32"], "trained with features=64"),
  ("fusion", ["--mode=eval", "--config.eval_batch_size=12"], "eval_batch_size=12 must be divisible"),
  ("fusion", ["--mode=eval", "--workdir={other}"], "not trained by this experiment"),
  ("fusion", ["--mode=eval", "--workdir={empty}"], "no checkpoint in"),
  ("fusion", ["--mode=eval", "--workdir={tmp}/missing"], "no checkpoint in"),
  ("fusion", ["--workdir={file}"], "is a file, not a directory"),
  ("clip", ["--config.model=huge"], "--config.model=huge: expected one of"),
  ("clip", ["--config.image_tower=cnn"], "--config.image_tower=cnn"),
  ("clip", ["--config.text_tower=gpt"], "--config.text_tower=gpt"),
  ("clip", ["--config.loss=hinge"], "--config.loss=hinge"),
  ("clip", ["--config.loss_impl=ring"], "--config.loss_impl=ring"),
  ("clip", ["--config.context_length=1"], "--config.context_length=1"),
  ("clip", ["--config.batch_size=12"], "divisible by the 8 data-parallel devices"),
  ("clip", ["--config.grad_accum_steps=3"], "not divisible by grad_accum_steps=3"),
  ("clip", ["--config.weight_decay=-0.1"], "--config.weight_decay=-0.1"),
  ("clip", ["--config.augment_shift=-2"], "--config.augment_shift=-2"),
  ("clip", ["--mode=eval", "--config.image_tower=vit"], "which the checkpoint fixes"),
  ("clip", ["--mode=eval", "--workdir={other}"], "not trained by this experiment"),
  ("clip", ["--mode=eval", "--config.eval_batch_size=0"], "--config.eval_batch_size=0"),
  ("avdcnn", ["--config.modalities=visual"], "--config.modalities=visual"),
  ("avdcnn", ["--config.model=huge"], "--config.model=huge"),
  ("avdcnn", ["--config.head=linear"], "--config.head=linear"),
  ("avdcnn", ["--config.mu=-1.0"], "--config.mu=-1.0"),
  ("avdcnn", ["--config.loss=l1"], "--config.loss=l1"),
  ("avdcnn", ["--config.grid_dir={tmp}/no_grid"], "expected an existing directory"),
  ("avdcnn", ["--config.eval_processes=0"], "--config.eval_processes=0"),
  ("avdcnn", ["--mode=eval", "--config.model=wide"], "trained with model='tiny'"),
  ("avdcnn", ["--mode=enhance", "--config.input={tmp}/none.wav", "--config.output={tmp}/o.wav"], "does not exist"),
  ("avdcnn", ["--mode=enhance", "--config.input={wav0}", "--config.output={tmp}/o.wav"], "too short to enhance"),
  ("avdcnn", ["--mode=enhance", "--config.input={wav0}"], "enhance needs"),
  ("avdcnn", ["--mode=enhance", "--config.input={wav0}", "--config.output={tmp}/no/o.wav"], "does not exist"),
  ("latent_diffusion", ["--mode=sample", "--config.guidance_scale=nan"], "--config.guidance_scale=nan"),
  ("latent_diffusion", ["--mode=sample", "--config.guidance_scale=-1.0"], "--config.guidance_scale=-1.0"),
  ("latent_diffusion", ["--mode=sample", "--config.sample_steps=0"], "--config.sample_steps=0"),
  ("latent_diffusion", ["--mode=sample", "--config.sample_steps=2000"], "choose 1 to num_train_timesteps"),
  ("latent_diffusion", ["--mode=sample", "--config.sampler=euler"], "--config.sampler=euler"),
  ("latent_diffusion", ["--mode=sample", "--config.num_samples=0"], "--config.num_samples=0"),
  ("latent_diffusion", ["--mode=sample", "--config.prompt= "], "--config.prompt= "),
  ("latent_diffusion", ["--mode=sample", "--config.dit=B"], "trained with dit='tiny'"),
  ("latent_diffusion", ["--mode=sample", "--config.prompt=a purple elephant"], "purple"),
  ("latent_diffusion", ["--config.condition=image"], "--config.condition=image"),
  ("latent_diffusion", ["--config.stage=both"], "--config.stage=both"),
  ("latent_diffusion", ["--config.autoencoder.batch_size=0"], "--config.autoencoder.batch_size=0"),
  ("latent_diffusion", ["--config.denoiser.keep_checkpoints=0"], "--config.denoiser.keep_checkpoints=0"),
  ("latent_diffusion", ["--config.denoiser.grad_accum_steps=3"], "denoiser.batch_size=16 is not divisible"),
  ("latent_diffusion", ["--config.cond_drop_prob=2.0"], "--config.cond_drop_prob=2.0"),
  ("latent_diffusion", ["--config.autoencoder.stepz=3"], "unknown config key 'autoencoder.stepz'"),
]  # fmt: skip


def _params(cases):
  for name, args, message in cases:
    marks = () if name in FAST else (pytest.mark.slow,)
    yield pytest.param(name, args, message, marks=marks, id=f"{name}:{' '.join(args)}")


def _bad_input(name, args, runs, data_dirs, tmp_path, capsys) -> str:
  """Runs experiment `name` on its trained run with the bad `args` (a CASES row) and returns the one
  error line, after checking that neither that run nor the other one named by {other} changed."""
  workdir, data_dir = runs(name), data_dirs(name)
  other = runs("clip" if name == "fusion" else "fusion")
  (tmp_path / "empty").mkdir(exist_ok=True)
  (tmp_path / "a_file").write_text("not a directory")
  wav0 = _wav(tmp_path / "empty.wav", [])
  subst = {"other": other, "empty": tmp_path / "empty", "file": tmp_path / "a_file", "tmp": tmp_path, "wav0": wav0}
  args = [a.format(**subst) for a in args]
  argv = ["--workdir", str(workdir), f"--config.data_dir={data_dir}"]
  if name == "latent_diffusion" and not any(a.startswith("--mode") for a in args):
    argv += TRAIN_ARGS[name]  # train mode: the run's own sizes, so only the bad key (given last) differs
  argv += args
  before = {run: _snapshot(run) for run in (workdir, other)}
  line = _one_line_failure(capsys, name, argv)
  # catches a bad input that adds, removes or rewrites anything in a trained run (a rewritten config or
  # metrics file, a new empty checkpoint dir, a lock file): "no file got shorter" let all of those pass
  for run, snapshot in before.items():
    _assert_unchanged(snapshot, run, argv)
  return line


@pytest.mark.parametrize("name,args,message", list(_params(CASES)))
def test_bad_input_is_one_line_and_changes_nothing(name, args, message, runs, data_dirs, tmp_path, capsys):
  line = _bad_input(name, args, runs, data_dirs, tmp_path, capsys)
  assert message in line, line


def _reads_the_run(args) -> bool:
  """A case in a mode that opens the trained run (eval, sample, enhance), where a slip could write to it."""
  return any(a.startswith("--mode") for a in args)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else (pytest.mark.slow,)) for n in EXPERIMENTS])
def test_latest_checkpoint_restores_after_bad_inputs(name, runs, data_dirs, tmp_path, capsys):
  """Self-contained (not relying on the table above having run first): this experiment's bad inputs that
  read the trained run are given here, then the run still restores from its latest checkpoint: fusion and
  AVDCNN through their evaluation on the command line; CLIP and latent diffusion through the restore their
  evaluation and sampling begin with (the eval-set encoding and the sampling after it take tens of seconds
  here and read nothing more from the run)."""
  workdir, data_dir = runs(name), data_dirs(name)
  cases = [(args, message) for n, args, message in CASES if n == name and _reads_the_run(args)]
  assert cases  # catches a filter that leaves nothing: the test would restore an untouched run
  for args, message in cases:
    assert message in _bad_input(name, args, runs, data_dirs, tmp_path, capsys)
  # catches a restore that falls back to an earlier checkpoint (or none) after the bad inputs
  if name == "clip":
    from multimodal_jax.clip import config as clip_config

    config = clip_config.get_config()
    config.data_dir = data_dir
    assert clip.restore(config, str(workdir), clip_config.EVAL_KEYS)[5] == checkpoint.saved_steps(str(workdir))[-1]
  elif name == "latent_diffusion":
    from multimodal_jax.latent_diffusion import config as ld_config
    from multimodal_jax.latent_diffusion.generate import Generator

    config = ld_config.get_config()
    config.data_dir = data_dir
    generator = Generator(config, str(workdir))
    latest = [checkpoint.saved_steps(str(workdir / stage))[-1] for stage in ("autoencoder", "denoiser")]
    assert [generator.ae_step, generator.step] == latest
  else:
    extra = ["--config.eval_utterances=1", "--config.eval_processes=1"] if name == "avdcnn" else []
    status = EXPERIMENTS[name].main(["--workdir", str(workdir), f"--config.data_dir={data_dir}", "--mode=eval", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and json.loads(out[-1])["step"] == checkpoint.saved_steps(str(workdir))[-1]


@pytest.mark.slow
def test_keep_checkpoints_cannot_delete_the_runs_checkpoints(runs, av_digits_dir, capsys):
  workdir, data_dir = runs("fusion"), av_digits_dir
  steps = checkpoint.saved_steps(str(workdir))
  _one_line_failure(
    capsys, "fusion", ["--workdir", str(workdir), f"--config.data_dir={data_dir}", "--config.keep_checkpoints=0"]
  )
  assert checkpoint.saved_steps(str(workdir)) == steps == [2, 4]


@pytest.mark.slow
def test_damaged_tfds_data_is_one_line_naming_the_fix(av_digits_dir, tmp_path, capsys):
  copy = tmp_path / "tfds"
  shutil.copytree(os.path.join(av_digits_dir, "av_digits"), copy / "av_digits")
  (shard,) = [p for p in (copy / "av_digits").rglob("av_digits-test.array_record*")]
  os.truncate(shard, os.path.getsize(shard) // 2)
  line = _one_line_failure(capsys, "fusion", ["--workdir", str(tmp_path / "run"), f"--config.data_dir={copy}"])
  assert "av_digits (test split" in line and "is damaged" in line and "delete" in line and "prepare it again" in line


def test_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
  """A kill between truncating and rewriting metrics.jsonl on resume leaves the old file whole."""
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 22)]
  path.write_text("".join(rows))

  def killed(src, dst):
    raise KeyboardInterrupt  # the process dies before the rename

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    metrics._truncate_jsonl(str(path), 10)
  assert path.read_text() == "".join(rows)
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
  monkeypatch.undo()
  metrics._truncate_jsonl(str(path), 10)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 11))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
  path = tmp_path / "eval.json"
  path.write_text('{"accuracy": 0.9}')

  def fail(f):
    f.write("{")
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError):
    atomic_write(str(path), fail)
  assert path.read_text() == '{"accuracy": 0.9}' and len(list(tmp_path.iterdir())) == 1


def _mount_tmpfs(path, size) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  if shutil.which("mount") is None or os.geteuid() != 0:
    return False
  done = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True
  )
  return done.returncode == 0


def _cli(workdir, data_dir, *args):
  env = {**os.environ, "MMJ_NO_TCMALLOC": "1"}
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  argv = [sys.executable, "-m", "experiments.fusion", "--workdir", str(workdir), f"--config.data_dir={data_dir}"]
  return subprocess.run([*argv, *args], check=False, capture_output=True, text=True, env=env, timeout=600)


SMALL_STEPS = ("--config.batch_size=32", "--config.checkpoint_every=2", "--config.eval_every=0")


@pytest.mark.slow
def test_disk_full_during_save_is_one_line_and_keeps_the_last_good_checkpoint(av_digits_dir, tmp_path):
  disk = tmp_path / "disk"
  if not _mount_tmpfs(disk, "9M"):
    pytest.skip("needs root to mount a small tmpfs")
  try:
    # checkpoints of ~3.9 MB every 2 steps (small batches: the steps are not what is tested): the third fills 9 MB
    done = _cli(disk / "run", av_digits_dir, "--config.steps=20", "--config.keep_checkpoints=10", *SMALL_STEPS)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
    steps = checkpoint.saved_steps(str(disk / "run"))
    assert err[0].startswith("error: no space left on") and f"step {steps[-1]} is the last good checkpoint" in err[0]
    assert not [n for n in os.listdir(disk / "run" / "checkpoints") if not n.isdigit()]  # no partial directory
    shutil.copytree(disk / "run", tmp_path / "moved")  # more space: the run resumes from the last good step
  finally:
    subprocess.run(["umount", str(disk)], check=False)
  done = _cli(tmp_path / "moved", av_digits_dir, f"--config.steps={steps[-1] + 2}", *SMALL_STEPS)
  assert done.returncode == 0 and f"resumed from the checkpoint at step {steps[-1]}" in done.stdout


@pytest.mark.slow
def test_read_only_workdir_is_one_line(av_digits_dir, tmp_path):
  disk = tmp_path / "ro"
  if not _mount_tmpfs(disk, "1M"):
    pytest.skip("needs root to mount a tmpfs")
  try:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    done = _cli(disk, av_digits_dir, "--config.steps=2")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "cannot write in --workdir" in err[0], done.stderr[-2000:]
    assert "Read-only file system" in err[0]
  finally:
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_truncated_latest_checkpoint_is_one_warning_line(runs, av_digits_dir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(runs("fusion"), copy)
  assert checkpoint.saved_steps(str(copy)) == [2, 4]
  for f in (copy / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      os.truncate(f, 10)
  damaged = _snapshot(copy / "checkpoints" / "4")
  done = _cli(copy, av_digits_dir, "--config.steps=6", "--config.checkpoint_every=2", "--config.eval_every=0")
  assert done.returncode == 0, done.stderr[-3000:]
  noise = [line for line in (done.stdout + done.stderr).splitlines() if "Traceback" in line or "Event loop" in line]
  warnings = [line for line in done.stdout.splitlines() if line.startswith("warning:")]
  assert not noise, done.stdout[-2000:] + done.stderr[-4000:]
  assert len(warnings) == 1 and "checkpoint at step 4 in" in warnings[0] and "unreadable" in warnings[0]
  assert "resumed from the checkpoint at step 2" in done.stdout
  # catches a damaged checkpoint deleted (or left in place) instead of set aside, as the README says:
  # WORKDIR/checkpoints_unreadable/4 holds exactly the damaged files
  assert sorted(os.listdir(copy / "checkpoints_unreadable")) == ["4"]
  assert _snapshot(copy / "checkpoints_unreadable" / "4") == damaged
  # catches a run that did not go on from step 2: steps 4 and 6 are written again by this run
  assert checkpoint.saved_steps(str(copy)) == [2, 4, 6]
