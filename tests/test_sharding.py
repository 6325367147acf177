import jax
import pytest

from multimodal_jax import sharding as shd
from multimodal_jax.config import check_divisible
from multimodal_jax.errors import UserError


def test_eight_devices_are_forced():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
  "spec, shape",
  [
    ("data:-1", (8, 1, 1)),
    ("data:4,fsdp:2", (4, 2, 1)),
    ("data:2,fsdp:2,tensor:2", (2, 2, 2)),
    ("tensor:2,data:-1", (4, 1, 2)),
  ],
)
def test_make_mesh(spec, shape):
  mesh = shd.make_mesh(spec)
  assert tuple(mesh.shape[a] for a in shd.MESH_AXES) == shape


@pytest.mark.parametrize(
  "spec, message",
  [
    ("data:3", "needs 3 devices"),
    ("data:-1,fsdp:3", "not divisible"),
    ("model:2", "bad mesh spec"),
    ("data:x", "not an integer"),
    ("data:-1,fsdp:-1", "at most one -1"),
    ("", "name at least one axis"),
  ],
)
def test_bad_mesh_specs_are_explained(spec, message):
  with pytest.raises(shd.MeshSpecError, match=message):
    shd.make_mesh(spec)


def test_batch_sizes_must_split_over_the_data_parallel_devices():
  mesh = shd.make_mesh("data:4,fsdp:2")  # 8 data-parallel devices (data x fsdp)
  check_divisible("batch_size", 16, mesh)
  with pytest.raises(UserError, match="batch_size=12 must be divisible by the 8 data-parallel devices"):
    check_divisible("batch_size", 12, mesh)


def test_logical_rules_shard_divisible_dims_and_replicate_the_rest():
  mesh = shd.make_mesh("data:2,fsdp:2,tensor:2")
  spec = shd.logical_to_sharding((64, 128), ("embed", "mlp"), mesh).spec
  assert tuple(spec) == ("fsdp", "tensor")
  spec = shd.logical_to_sharding((63, 128), ("embed", "mlp"), mesh).spec
  assert tuple(spec) == (None, "tensor")  # 63 rows cannot be split in 2
  assert tuple(shd.batch_sharding(mesh, 3).spec) == (("data", "fsdp"), None, None)
