"""Property-based tests (hypothesis) of the parsers and index arithmetic that take arbitrary input:
mesh specs, config overrides, microbatch splitting, the STFT / ISTFT round trip, `GrainBatches.seek`
and diffusion timestep spacing.

Example counts come from the hypothesis profile in conftest.py ("fast" by default; run with
`--hypothesis-profile=thorough` for many more, freshly random, examples).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from multimodal_jax import audio, train
from multimodal_jax import sharding as shd
from multimodal_jax.config import apply_overrides
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion import diffusion as df

# A test whose every example starts grain iterators (each a pool of reader threads) takes a third of the examples.
_FEWER = settings(max_examples=max(8, settings().max_examples // 3))

# ---------------------------------------------------------------------------------------------- mesh


def _assume_one_line(message: str) -> None:
  assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"


_MESH_PIECES = st.sampled_from(
  ["data", "fsdp", "tensor", "model", "batch", ":", ",", " ", "-1", "0", "1", "2", "4", "8", "3", "16", "+2", "x", "-2"]
)
_MESH_SPECS = st.one_of(st.text(max_size=40), st.lists(_MESH_PIECES, max_size=14).map("".join))


@given(spec=_MESH_SPECS)
def test_a_mesh_spec_makes_a_mesh_of_all_devices_or_a_one_line_error(spec):
  devices = jax.devices()
  try:
    mesh = shd.make_mesh(spec, devices)
  except shd.MeshSpecError as e:
    _assume_one_line(str(e))
    return
  assert mesh.axis_names == shd.MESH_AXES
  assert math.prod(mesh.devices.shape) == len(devices)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  for name, size in shd.parse_mesh_spec(spec).items():
    if size != -1:
      assert mesh.shape[name] == size


@st.composite
def _fitting_mesh_specs(draw):
  """A well-formed spec whose sizes fit 8 devices: factors of 8 over a subset of the axes, one maybe -1."""
  axes = draw(st.permutations(shd.MESH_AXES))[: draw(st.integers(1, 3))]
  exponents = [0] * len(axes)
  for _ in range(3):  # 8 = 2 ** 3, the three factors of 2 dealt to the named axes
    exponents[draw(st.integers(0, len(axes) - 1))] += 1
  sizes = [2**e for e in exponents]
  wildcard = draw(st.one_of(st.none(), st.integers(0, len(axes) - 1)))
  parts = [f"{a}:{-1 if i == wildcard else s}" for i, (a, s) in enumerate(zip(axes, sizes, strict=True))]
  sep = draw(st.sampled_from([",", ", ", " ,"]))
  return sep.join(parts), dict(zip(axes, sizes, strict=True))


@given(case=_fitting_mesh_specs())
def test_every_fitting_mesh_spec_parses_to_its_sizes(case):
  spec, sizes = case
  mesh = shd.make_mesh(spec, jax.devices())
  assert dict(mesh.shape) == {name: sizes.get(name, 1) for name in shd.MESH_AXES}


# ------------------------------------------------------------------------------------ config overrides


def _config():
  return ml_collections.ConfigDict(
    {
      "steps": 100,
      "learning_rate": 1e-3,
      "remat": False,
      "mesh": "data:-1",
      "denoiser": {"batch_size": 8, "ema_decay": 0.99, "flag": True, "inner": {"name": "x"}},
    }
  )


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


_KEYS = [k for k, _ in _leaves(_config().to_dict())]
_VALUES = st.one_of(
  st.text(max_size=12),
  st.integers().map(str),
  st.floats(allow_nan=True, allow_infinity=True).map(repr),
  st.sampled_from(["true", "False", " yes ", "0", "1", "1.5", "-3", "1e3", "1_000", "nan", ""]),
)
_OVERRIDES = st.one_of(
  st.tuples(st.sampled_from(_KEYS + ["denoiser", "denoiser.inner", "nope", "steps.x", ".steps", ""]), _VALUES).map(
    "=".join
  ),
  st.text(max_size=30),
)


@given(overrides=st.lists(_OVERRIDES, max_size=4))
def test_config_overrides_keep_each_keys_type_or_raise_user_error(overrides):
  base = _config()
  before = base.to_dict()
  try:
    out = apply_overrides(base, overrides)
  except UserError as e:
    _assume_one_line(str(e))  # values that would not read as one line are quoted
    return
  assert base.to_dict() == before  # the input config is not changed
  got = dict(_leaves(out.to_dict()))
  assert set(got) == set(_KEYS)
  last = {}
  for item in overrides:
    key, _, text = item.partition("=")
    last[key] = text
  for key, value in _leaves(before):
    assert type(got[key]) is type(value), key
    if key not in last:
      assert got[key] == value, key
    elif isinstance(value, str):
      assert got[key] == last[key]
    elif isinstance(value, int) and not isinstance(value, bool):
      assert got[key] == int(last[key])


# ---------------------------------------------------------------------------------- microbatch split


@given(
  num=st.integers(1, 6),
  rows_per_micro=st.integers(1, 5),
  trailing=st.lists(st.integers(1, 3), max_size=2),
)
def test_microbatch_split_puts_every_row_in_exactly_one_strided_microbatch(num, rows_per_micro, trailing):
  batch_size = num * rows_per_micro
  ids = np.arange(batch_size)
  x = np.broadcast_to(ids.reshape(-1, *([1] * len(trailing))), (batch_size, *trailing)).astype(np.int32)
  micro = train._split_microbatches({"x": x, "id": ids}, num)
  got = np.asarray(micro["id"])
  assert got.shape == (num, rows_per_micro)
  np.testing.assert_array_equal(np.sort(got.reshape(-1)), ids)  # each row exactly once
  for i in range(num):
    np.testing.assert_array_equal(got[i], ids[i::num])  # rows i, i + num, ...
  np.testing.assert_array_equal(np.asarray(micro["x"]), x[got])


@given(num=st.integers(2, 6), batch_size=st.integers(1, 30))
def test_microbatch_split_refuses_a_batch_it_cannot_divide(num, batch_size):
  assume(batch_size % num)
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps"):
    train._split_microbatches({"x": np.zeros((batch_size, 2))}, num)


# ------------------------------------------------------------------------------------ STFT round trip


@st.composite
def _stft_settings(draw):
  n_fft = draw(st.one_of(st.sampled_from([8, 16, 64, 512]), st.integers(4, 96)))
  # Hann windows overlapping by at least half (or AVDCNN's 512 / 320) cover every sample.
  hop = 320 if n_fft == 512 and draw(st.booleans()) else draw(st.integers(1, n_fft // 2))
  length = draw(st.integers(1, 4 * n_fft))
  batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
  return n_fft, hop, length, batch


@given(case=_stft_settings(), seed=st.integers(0, 2**16))
def test_istft_inverts_stft(case, seed):
  n_fft, hop, length, batch = case
  x = np.random.default_rng(seed).uniform(-1, 1, size=(*batch, length)).astype(np.float32)

  @jax.jit  # one compilation per example instead of one per eager op and shape
  def round_trip(x):
    spectrum = audio.stft(x, n_fft=n_fft, hop=hop)
    return spectrum, audio.istft(spectrum, length, n_fft=n_fft, hop=hop)

  spectrum, back = round_trip(jnp.asarray(x))
  assert spectrum.shape == (*batch, audio.num_frames(length, n_fft, hop), n_fft // 2 + 1)
  assert back.shape == x.shape
  np.testing.assert_allclose(np.asarray(back), x, atol=2e-4)


@given(length=st.integers(1, 2000), extra=st.integers(1, 3))
def test_istft_refuses_a_frame_count_that_does_not_match_the_length(length, extra):
  frames = audio.num_frames(length, 64, 16)
  with pytest.raises(ValueError, match="frames do not match"):
    audio.istft(np.zeros((frames + extra, 33), np.complex64), length, n_fft=64, hop=16)


# ---------------------------------------------------------------------------------- GrainBatches.seek


class _IdSource:
  """`n` records `{"id": i}`; `batch(rows)` fetches several at once (for `fetch_batches=True`)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"id": np.int64(i)}

  def batch(self, rows):
    return {"id": np.asarray(rows, np.int64)}


@_FEWER
@given(
  records=st.integers(1, 40),
  local_batch=st.integers(1, 6),
  process_count=st.integers(1, 3),
  process_index=st.integers(0, 2),
  seed=st.integers(0, 1000),
  steps=st.lists(st.integers(0, 12), min_size=1, max_size=4),
  fetch_batches=st.booleans(),
)
def test_seek_gives_the_batch_of_a_stream_read_from_the_start(
  records, local_batch, process_count, process_index, seed, steps, fetch_batches
):
  assume(process_index < process_count and records // process_count >= local_batch)
  source = _IdSource(records)
  kw = {"seed": seed, "process_index": process_index, "process_count": process_count, "fetch_batches": fetch_batches}
  from_start = GrainBatches(source, local_batch * process_count, **kw)
  expected = [next(from_start)["id"] for _ in range(max(steps) + 1)]
  sought = GrainBatches(source, local_batch * process_count, **kw)
  for step in steps:  # forwards and backwards, on one stream
    sought.seek(step)
    got = next(sought)["id"]
    assert got.shape == (local_batch,)
    np.testing.assert_array_equal(got, expected[step])


# --------------------------------------------------------------------------------- diffusion timesteps


def _check_steps(ts, num_train, num_steps):
  assert ts.dtype == np.int32 and ts.shape == (num_steps,)
  assert ts.min() >= 0 and ts.max() < num_train, (ts.min(), ts.max())
  assert np.all(np.diff(ts) < 0), "not strictly descending (so not distinct)"


@st.composite
def _train_and_sample_steps(draw):
  num_train = draw(st.one_of(st.integers(1, 2000), st.sampled_from([1000, 999, 1001, 4000])))
  return num_train, draw(st.integers(1, num_train))


@pytest.mark.parametrize("spacing", df.SPACINGS)
@given(case=_train_and_sample_steps())
def test_timesteps_are_n_distinct_descending_steps_in_range(spacing, case):
  num_train, num_steps = case
  _check_steps(df.timesteps(num_train, num_steps, spacing), num_train, num_steps)


@pytest.mark.parametrize("spacing", df.SPACINGS)
def test_timesteps_for_every_count_of_a_1000_step_schedule(spacing):
  for num_steps in range(1, 1001):
    _check_steps(df.timesteps(1000, num_steps, spacing), 1000, num_steps)


@given(case=_train_and_sample_steps())
def test_trailing_timesteps_are_the_float_arange_rule_where_it_gives_n_steps(case):
  # diffusers' rule, round(arange(T, 0, -T/n)) - 1: where float rounding lets it make n + 1 steps
  # (the last -1, e.g. T=1000, n=61) ours are its first n.
  num_train, num_steps = case
  reference = (np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1).astype(np.int32)
  np.testing.assert_array_equal(df.timesteps(num_train, num_steps, "trailing"), reference[:num_steps])


@pytest.mark.parametrize("spacing", df.SPACINGS)
@given(num_train=st.integers(1, 2000), num_steps=st.integers(-5, 4000))
def test_timesteps_refuse_counts_outside_one_to_T_in_one_line(spacing, num_train, num_steps):
  assume(not 1 <= num_steps <= num_train)
  with pytest.raises(ValueError, match=f"num_steps={num_steps}: must be between 1 and") as e:
    df.timesteps(num_train, num_steps, spacing)
  _assume_one_line(str(e.value))


@given(case=_train_and_sample_steps(), steps_offset=st.integers(-3, 3))
def test_leading_steps_offset_gives_steps_in_range_or_a_one_line_error(case, steps_offset):
  num_train, num_steps = case
  try:
    ts = df.timesteps(num_train, num_steps, "leading", steps_offset)
  except ValueError as e:
    _assume_one_line(str(e))
    plain = df.timesteps(num_train, num_steps, "leading")
    assert plain[0] + steps_offset >= num_train or plain[-1] + steps_offset < 0
    return
  _check_steps(ts, num_train, num_steps)


@pytest.mark.parametrize("sampler", df.SAMPLERS)
def test_sample_runs_61_trailing_steps_of_1000(sampler):
  # 61 of 1000 was 62 steps ending in -1 and failed inside lax.scan.
  schedule = df.make_schedule("linear", 1000)
  x_T = jax.random.normal(jax.random.key(0), (2, 3))
  out = df.sample(
    lambda x, t: 0.1 * x, schedule, x_T, jax.random.key(1), sampler=sampler, num_steps=61, spacing="trailing"
  )
  assert out.shape == x_T.shape and bool(jnp.all(jnp.isfinite(out)))
