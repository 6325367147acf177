"""Reading torch.save files without PyTorch: against files written the way torch.save writes them
(here, by a writer of the same layout) and, when PyTorch is installed, against torch.save itself."""

import collections
import io
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from multimodal_jax.convert import torch_files


class _Tensor:
  """Pickles as torch does: `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`."""

  def __init__(self, storage_key, storage_type, offset, shape, stride):
    self.args = (storage_key, storage_type, offset, shape, stride)

  def __reduce__(self):
    key, storage_type, offset, shape, stride = self.args
    storage = _StorageRef(key, storage_type)
    return sys.modules["torch._utils"]._rebuild_tensor_v2, (
      storage,
      offset,
      shape,
      stride,
      False,
      collections.OrderedDict(),
    )


class _StorageRef:
  def __init__(self, key, storage_type):
    self.key, self.storage_type = key, storage_type


def _write_torch_zip(path, tree, storages, name="archive"):
  """Writes `tree` (which holds _Tensor objects) and raw `storages` {key: bytes} in torch.save's zip layout."""
  fake_utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  fake_torch = types.ModuleType("torch")
  storage_classes = {}
  for cls_name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "BoolStorage"):
    cls = type(cls_name, (), {"__module__": "torch", "__qualname__": cls_name})
    setattr(fake_torch, cls_name, cls)
    storage_classes[cls_name] = cls

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _StorageRef):
        return ("storage", storage_classes[obj.storage_type], obj.key, "cpu", 0)
      return None

  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
  try:
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(tree)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{name}/data.pkl", buffer.getvalue())
    z.writestr(f"{name}/byteorder", "little")
    for key, raw in storages.items():
      z.writestr(f"{name}/data/{key}", raw)
    z.writestr(f"{name}/version", "3\n")


def test_reads_tensors_views_dtypes_and_containers(tmp_path):
  weights = np.arange(24, dtype=np.float32)
  half = np.array([1.5, -2.0, 3.25], np.float16)
  bf16 = np.array([0.5, 1.0], ml_dtypes.bfloat16)
  ids = np.array([[1, 2], [3, 4]], np.int64)
  tree = {
    "state_dict": collections.OrderedDict(
      [
        ("w", _Tensor("0", "FloatStorage", 0, (2, 3), (3, 1))),
        ("w_t", _Tensor("0", "FloatStorage", 6, (3, 2), (1, 3))),  # a transposed view of the same storage
        ("scalar", _Tensor("0", "FloatStorage", 23, (), ())),
        ("half", _Tensor("1", "HalfStorage", 0, (3,), (1,))),
        ("bf16", _Tensor("2", "BFloat16Storage", 0, (2,), (1,))),
        ("ids", _Tensor("3", "LongStorage", 0, (2, 2), (2, 1))),
      ]
    ),
    "epoch": 3,
  }
  raw = {"0": weights.tobytes(), "1": half.tobytes(), "2": bf16.tobytes(), "3": ids.tobytes()}
  _write_torch_zip(tmp_path / "model.pt", tree, raw)
  loaded = torch_files.load(tmp_path / "model.pt")
  sd = loaded["state_dict"]
  assert loaded["epoch"] == 3 and list(sd) == ["w", "w_t", "scalar", "half", "bf16", "ids"]
  np.testing.assert_array_equal(sd["w"], weights[:6].reshape(2, 3))
  np.testing.assert_array_equal(sd["w_t"], weights[6:12].reshape(2, 3).T)
  assert sd["scalar"].shape == () and float(sd["scalar"]) == 23.0
  np.testing.assert_array_equal(sd["half"], half)
  assert sd["bf16"].dtype == ml_dtypes.bfloat16 and np.array_equal(sd["bf16"].astype(np.float32), [0.5, 1.0])
  np.testing.assert_array_equal(sd["ids"], ids)


def test_refuses_arbitrary_objects_torchscript_legacy_and_damaged_files(tmp_path):
  evil = tmp_path / "evil.pt"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(types.SimpleNamespace(a=1), protocol=2))
  with pytest.raises(torch_files.CheckpointFormatError, match="types.SimpleNamespace.*not a tensor"):
    torch_files.load(evil)
  script = tmp_path / "jit.pt"
  with zipfile.ZipFile(script, "w") as z:
    z.writestr("model/data.pkl", b"")
    z.writestr("model/constants.pkl", b"")
  with pytest.raises(torch_files.CheckpointFormatError, match="TorchScript archive"):
    torch_files.load(script)
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(torch_files.CheckpointFormatError, match="not a PyTorch zip checkpoint"):
    torch_files.load(legacy)
  _write_torch_zip(tmp_path / "ok.pt", {"w": _Tensor("0", "FloatStorage", 0, (2,), (1,))}, {"0": b"\0" * 8})
  data = (tmp_path / "ok.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_files.CheckpointFormatError, match="damaged or truncated"):
    torch_files.load(tmp_path / "cut.pt")
  with pytest.raises(torch_files.CheckpointFormatError, match="does not exist"):
    torch_files.load(tmp_path / "missing.pt")
  (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  with pytest.raises(torch_files.CheckpointFormatError, match="not a readable .safetensors file"):
    torch_files.read_safetensors(str(tmp_path / "cut.safetensors"))


def test_equals_torch_load_on_files_torch_saved(tmp_path):
  torch = pytest.importorskip("torch", reason="the comparison with torch.save needs the parity extra")
  g = torch.Generator().manual_seed(0)
  state = collections.OrderedDict(
    w=torch.randn(4, 5, generator=g),
    t=torch.randn(5, 4, generator=g).t(),  # non-contiguous
    h=torch.randn(3, generator=g).half(),
    b=torch.randn(3, generator=g).bfloat16(),
    i=torch.arange(6).reshape(2, 3),
    m=torch.tensor([True, False]),
    p=torch.nn.Parameter(torch.ones(2)),
  )
  torch.save({"state_dict": state, "step": 7}, tmp_path / "x.pt")
  ours = torch_files.load(tmp_path / "x.pt")
  assert ours["step"] == 7
  for name, value in state.items():
    want = value.detach().float().numpy() if value.dtype == torch.bfloat16 else value.detach().numpy()
    got = ours["state_dict"][name]
    got = got.astype(np.float32) if got.dtype == ml_dtypes.bfloat16 else got
    np.testing.assert_array_equal(got, want, err_msg=name)
