"""Test setup: 8 simulated CPU devices, forced before JAX starts; hypothesis profiles; the embedded data,
built once."""

import os

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from hypothesis import HealthCheck, settings

# Property tests: few, reproducible examples by default (they are in the fast subset); no example
# database in the tree. `pytest --hypothesis-profile=thorough` draws many fresh random examples.
settings.register_profile(
  "fast", max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None, database=None)
settings.load_profile("fast")


@pytest.fixture(scope="session")
def av_digits_dir(tmp_path_factory):
  """A TFDS data dir holding AV-digits (built once per session, ~20 s; MMJ_TEST_DATA_DIR reuses one)."""
  from multimodal_jax.datasets import av_digits
  from multimodal_jax.errors import MissingDataPackageError

  data_dir = os.environ.get("MMJ_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tensorflow_datasets"))
  try:
    av_digits.load(data_dir)
  except MissingDataPackageError as e:
    pytest.fail(f"the embedded data cannot be built: {e}", pytrace=False)
  return data_dir


@pytest.fixture(scope="session")
def av_speech_dir(tmp_path_factory):
  """A TFDS data dir holding AV-speech's tiny config (built once per session, a few seconds)."""
  from multimodal_jax.datasets import av_speech
  from multimodal_jax.errors import MissingDataPackageError

  data_dir = os.environ.get("MMJ_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tensorflow_datasets"))
  try:
    av_speech.load(data_dir, config="tiny")
  except MissingDataPackageError as e:
    pytest.fail(f"the embedded speech data cannot be built: {e}", pytrace=False)
  return data_dir
