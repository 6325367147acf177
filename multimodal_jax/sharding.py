"""Device meshes, the one table of logical axis rules, and global batches.

Model code names array axes by role ("embed", "mlp", "heads", ...); this file alone maps those
roles onto the mesh axes `data`, `fsdp` and `tensor`. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Axes a global batch is split over. FSDP shards the batch as well as the params.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes (or None: replicated). The single place where roles meet devices.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),  # model width: FSDP shards params along it
  ("mlp", "tensor"),  # hidden width of MLPs: tensor parallel
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("classes", None),
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("conv_height", None),
  ("conv_width", None),
  ("length", None),
  ("layers", None),  # the stacked axis of nn.scan'd layers
  ("modalities", None),
  ("norm", None),
  # Activations: the batch over the data axes, the model width whole (FSDP shards the width of the
  # params only: gathering them per layer is its design; an activation split along it would be
  # re-partitioned against the batch split in every layer), hidden widths and heads over tensor.
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
)


def current_platform() -> str:
  """The platform ("cpu", "gpu" or "tpu") of the mesh being traced for (the abstract mesh that
  `jax.sharding.use_abstract_mesh` set: the train step sets it from its mesh), else that of this
  process's devices. Backend choices in model code (attention kernels, CPU-only layouts) ask this, not
  the process's default backend, so that a step compiled for compile-only TPU or GPU devices on a CPU
  host is the step those devices would run."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  return platform_name(device.platform if device is not None else jax.devices()[0].platform)


def platform_name(platform: str) -> str:
  """A device's platform as the choices above name it: "cpu", "gpu" (CUDA or ROCm) or "tpu"."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def mesh_platform(mesh: Mesh) -> str:
  """The platform of a mesh's devices ("cpu", "gpu" or "tpu")."""
  return platform_name(mesh.devices.flat[0].platform)


class MeshSpecError(ValueError):
  """A mesh spec that is malformed or does not fit the available devices."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses "data:4,fsdp:2" into {"data": 4, "fsdp": 2}; one size may be -1 (all the rest)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition(":")
    if not sep or name not in MESH_AXES:
      raise MeshSpecError(
        f"bad mesh spec {spec!r}: expected comma-separated AXIS:SIZE with AXIS in {MESH_AXES}, "
        "e.g. 'data:-1' or 'data:4,fsdp:2'"
      )
    if name in sizes:
      raise MeshSpecError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise MeshSpecError(f"bad mesh spec {spec!r}: size {size!r} of axis {name!r} is not an integer") from None
  if not sizes:
    raise MeshSpecError(f"bad mesh spec {spec!r}: name at least one axis, e.g. 'data:-1'")
  return sizes


def make_mesh(spec: str = "data:-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) from a spec such as "data:2,fsdp:2,tensor:2".

  Axes missing from the spec have size 1. Raises MeshSpecError when the sizes do not multiply to
  the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec)
  wildcard = [name for name, size in sizes.items() if size == -1]
  if len(wildcard) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise MeshSpecError(f"bad mesh spec {spec!r}: sizes must be positive, with at most one -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if wildcard:
    if len(devices) % fixed:
      raise MeshSpecError(
        f"mesh {spec!r} does not fit {len(devices)} devices: {len(devices)} is not divisible by {fixed}"
      )
    sizes[wildcard[0]] = len(devices) // fixed
  elif fixed != len(devices):
    raise MeshSpecError(
      f"mesh {spec!r} needs {fixed} devices but {len(devices)} are available; "
      "give sizes whose product is the device count, or use -1 for one axis"
    )
  shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def _mesh_axes_for(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
  if name is None:
    return ()
  if name not in rules:
    raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
  axes = rules[name]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_sharding(
  shape: Sequence[int],
  logical_axes: Sequence[str | None] | None,
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
  """The NamedSharding of an array whose axes have the given logical names.

  A dimension that its mesh axes do not divide evenly is replicated instead (as big_vision's
  FSDP does), so small models work on any mesh; a mesh axis is used at most once per array.
  """
  if logical_axes is None:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, logical_to_spec(shape, logical_axes, mesh.shape, rules))


def logical_to_spec(
  shape: Sequence[int],
  logical_axes: Sequence[str | None],
  mesh_shape: Mapping[str, int],
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> P:
  """The PartitionSpec of `logical_to_sharding` for a mesh of axis sizes `mesh_shape`."""
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical_axes, strict=True):
    axes = tuple(a for a in _mesh_axes_for(name, rule_map) if mesh_shape.get(a, 1) > 1 and a not in used)
    if axes and dim % math.prod(mesh_shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding its logical axis names give (activation names such as
  "activation_batch", through LOGICAL_AXIS_RULES), on the mesh the train step traces under
  (`jax.sharding.use_abstract_mesh`, which `train.make_train_step` sets). Without such a mesh (a
  plain `model.apply`) it returns `x` as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(a not in mesh.shape for a in MESH_AXES):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(x.shape, logical_axes, mesh.shape))


def tree_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh) -> Any:
  """Shardings for a tree of arrays given a matching tree of logical PartitionSpecs.

  `logical_specs` is what `flax.linen.get_partition_spec` returns for a boxed tree: a
  PartitionSpec of logical names per leaf (an empty one for unannotated leaves).
  """
  return jax.tree.map(
    lambda x, spec: logical_to_sharding(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec)), mesh),
    abstract_tree,
    logical_specs,
    is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over the data axes, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def host_to_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Stitches each process's rows of the batch into global arrays sharded over the data axes.

  Every process passes its own `[local_batch, ...]` numpy arrays; the result is a tree of global
  `jax.Array`s of leading size `local_batch * process_count`.
  """

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(to_global, local_batch)
