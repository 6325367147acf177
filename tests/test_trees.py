"""The one leaf-name helper (`trees.path_name`) and its three users: checkpoint array names, the
optimizer's parameter paths, the keys of `files.save_tree`."""

import collections

import flax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from flax import linen as nn

from multimodal_jax import checkpoint, files, train, trees

Moments = collections.namedtuple("Moments", ["mu", "nu"])


@flax.struct.dataclass
class State:
  step: int
  opt_state: tuple


def test_names_of_dict_keys_fields_and_indices():
  tree = State(
    step=0,
    opt_state=(Moments(mu={"dense": {"kernel": 1}}, nu=[2, 3]), {"blocks": [{"scale": 4}, (5,)]}, {7: 6}),
  )
  names = [trees.path_name(p) for p, _ in jtu.tree_leaves_with_path(tree)]
  assert names == [
    "step",
    "opt_state.0.mu.dense.kernel",
    "opt_state.0.nu.0",
    "opt_state.0.nu.1",
    "opt_state.1.blocks.0.scale",
    "opt_state.1.blocks.1.0",
    "opt_state.2.7",
  ]
  assert [checkpoint.dotted(p) for p, _ in jtu.tree_leaves_with_path(tree)] == names
  assert trees.path_name(jtu.tree_leaves_with_path(tree)[1][0], "/") == "opt_state/0/mu/dense/kernel"


def test_param_paths_look_through_boxes_and_keep_every_module_name():
  box = lambda shape: nn.Partitioned(jnp.zeros(shape), names=("embed",) * len(shape))
  params = {"attention": {"value": {"kernel": box((2, 2)), "bias": box((2,))}}, "ln": {"scale": box((2,))}}
  # "value" is a module name here (BERT's attention), not the box's field: it stays in the path.
  assert train.param_paths(params) == ["attention/value/bias", "attention/value/kernel", "ln/scale"]
  assert jtu.tree_leaves(train._map_paths(train.decays, params)) == [False, True, False]


def test_save_tree_keys_are_slash_joined_paths(tmp_path):
  tree = {"conv": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}, "mean": np.arange(3), "empty": {}}
  files.save_tree(str(tmp_path / "t.npz"), tree, {"step": 3})
  with np.load(tmp_path / "t.npz") as data:
    assert sorted(data.files) == ["__meta__", "conv/bias", "conv/kernel", "mean"]
  loaded, meta = files.load_tree(str(tmp_path / "t.npz"))
  assert meta == {"step": 3} and sorted(loaded) == ["conv", "mean"]
  np.testing.assert_array_equal(loaded["conv"]["kernel"], tree["conv"]["kernel"])
  np.testing.assert_array_equal(loaded["mean"], tree["mean"])
