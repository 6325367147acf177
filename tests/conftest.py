"""Test setup: 8 simulated CPU devices and quick CPU compiles, forced before JAX starts; tcmalloc for the
processes the session starts; a compilation cache of the session's own; hypothesis profiles; the embedded
data, built once.

Compilation cache: experiments launched through `multimodal_jax.cli` turn on JAX's persistent cache,
by default in the user's ~/.cache, and once on it stays on for the rest of the process. So the
session sets its own before anything compiles: a fresh temporary directory (removed at the end),
on from the first test to the last whatever the order, and named in $MMJ_COMPILE_CACHE, which
`profiling.setup_compile_cache("")` (the CLI's default) and child processes read, so no test reads
or writes the user's cache. `MMJ_TEST_COMPILE_CACHE=DIR` reuses DIR across sessions (a warm cache,
as for the timings in docs/testing_times.md); `MMJ_TEST_COMPILE_CACHE=off` runs without one. A
JAX_COMPILATION_CACHE_DIR of the caller's is dropped. Tests that need fresh compiles (the
involuntary-rematerialization check) turn it off in their own subprocess.
"""

import atexit
import os
import shutil
import tempfile

from multimodal_jax import launch  # imports nothing heavy: JAX is not loaded yet
from tests.xla_flags import QUICK_COMPILE, QUICK_COMPILE_ENV, device_count_flag

# The XLA flags of the session (tests/xla_flags.py: 8 devices for the meshes, quick compiles); a flag
# the caller already set is kept, and xdist workers inherit the result.
for _flag in (device_count_flag(8), *QUICK_COMPILE):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
for _key, _value in QUICK_COMPILE_ENV.items():
  os.environ.setdefault(_key, _value)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# tcmalloc for the processes the session starts (pytest-xdist's workers, the tests' subprocesses) where it is
# installed, as the experiments' launcher does: with glibc malloc XLA's CPU runtime spends much of its time in
# page faults (docs/testing_times.md). The controller itself runs no test; `-n 0` runs with the caller's allocator.
_preloaded = launch.with_tcmalloc(dict(os.environ))
if _preloaded is not None:
  os.environ["LD_PRELOAD"] = _preloaded["LD_PRELOAD"]

SESSION_COMPILE_CACHE = os.environ.get("MMJ_TEST_COMPILE_CACHE", "").strip()
if not SESSION_COMPILE_CACHE:
  SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="mmj-test-jax-cache-")
  atexit.register(shutil.rmtree, SESSION_COMPILE_CACHE, ignore_errors=True)
  # pytest-xdist's workers start after this module ran in the controller and inherit its environment:
  # they share the controller's cache (JAX writes its entries atomically), which it removes at the end.
  os.environ["MMJ_TEST_COMPILE_CACHE"] = SESSION_COMPILE_CACHE
os.environ["MMJ_COMPILE_CACHE"] = SESSION_COMPILE_CACHE
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # JAX would read it at import: the caller's cache

from multimodal_jax import profiling  # after the flags above: it imports JAX

profiling.setup_compile_cache(SESSION_COMPILE_CACHE)  # before the first test compiles anything ("off": stays off)

import filelock
import pytest
from hypothesis import HealthCheck, settings


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (the default, pyproject.toml): one worker a core, at most 4. Every worker holds its own 8
  simulated devices and compiles alone; more workers than that on a big host only add startup time."""
  return max(1, min(4, len(os.sched_getaffinity(0))))


# Property tests: few, reproducible examples by default (they are in the fast subset); no example
# database in the tree. `pytest --hypothesis-profile=thorough` draws many fresh random examples.
settings.register_profile(
  "fast", max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None, database=None)
settings.load_profile("fast")


def _session_dir(tmp_path_factory, name: str) -> str:
  """A directory of the session that every pytest-xdist worker sees (in the session's common temp dir)."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return str(tmp_path_factory.mktemp(name))
  path = tmp_path_factory.getbasetemp().parent / name
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory):
  """The one TFDS data dir of the session (MMJ_TEST_DATA_DIR reuses one): each embedded dataset is built
  into it at most once, by the fixtures below, whichever test asks first. Under pytest-xdist the workers
  share one, in the session's common temp dir (`_build` serialises the builds)."""
  if os.environ.get("MMJ_TEST_DATA_DIR"):
    return os.environ["MMJ_TEST_DATA_DIR"]
  return _session_dir(tmp_path_factory, "tensorflow_datasets")


def _build(load, data_dir, what, **kw):
  """Builds (or, once built, loads) one embedded dataset into `data_dir`, one process at a time: another
  xdist worker asking for the same data waits for the first build and then reads it."""
  from multimodal_jax.errors import MissingDataPackageError

  with filelock.FileLock(os.path.join(data_dir, f".build-{what.replace(' ', '_')}.lock")):
    try:
      load(data_dir, **kw)
    except MissingDataPackageError as e:
      pytest.fail(f"{what} cannot be built: {e}", pytrace=False)
  return data_dir


@pytest.fixture(scope="session")
def av_digits_dir(session_data_dir):
  """The session's data dir, holding AV-digits (built once per session, ~20 s), with the splits its build
  wrote (tests/runs.py), which tests/datasets/test_av_digits.py compares the written records with."""
  from tests import runs

  return _build(runs.load_av_digits_keeping_splits, session_data_dir, "the embedded data")


@pytest.fixture(scope="session")
def captioned_dir(av_digits_dir):
  """The session's data dir, holding captioned digits (built once per session from AV-digits' images) and
  AV-digits."""
  from multimodal_jax.datasets import captioned_digits

  return _build(captioned_digits.load, av_digits_dir, "the embedded captioned digits")


@pytest.fixture(scope="session")
def av_speech_dir(session_data_dir):
  """The session's data dir, holding AV-speech's tiny config (built once per session, a few seconds)."""
  from multimodal_jax.datasets import av_speech

  return _build(av_speech.load, session_data_dir, "the embedded speech data", config="tiny")


@pytest.fixture(scope="session")
def trained_runs(request, tmp_path_factory):
  """`get(name)`: a fresh copy of the session's tiny trained run of experiment `name` (arguments in
  tests/runs.py), in a new temp dir the caller may change. The run is trained once a session, by the first
  test that asks, on the session's data; other xdist workers wait for it (a file lock) and copy it."""
  from tests import runs

  root = _session_dir(tmp_path_factory, "trained_runs")

  def get(name: str):
    data_dir = request.getfixturevalue(runs.DATA_FIXTURE[name])
    built = os.path.join(root, name)
    with filelock.FileLock(built + ".lock"):
      if not os.path.exists(built + ".done"):  # a run left half-trained by a failed build is trained again
        shutil.rmtree(built, ignore_errors=True)
        status = runs.experiment(name).main(
          ["--workdir", built, f"--config.data_dir={data_dir}", *runs.TRAIN_ARGS[name]]
        )
        if status != 0:
          pytest.fail(f"the session's {name} run did not train (exit status {status})", pytrace=False)
        open(built + ".done", "w").close()
    copy = tmp_path_factory.mktemp(name)
    shutil.copytree(built, copy, dirs_exist_ok=True)
    return copy

  return get
