"""Reading PyTorch checkpoint files (`torch.save`, `.pt` / `.pth` / `.bin`) without PyTorch, and
`.safetensors` files with one-line errors.

Since PyTorch 1.6 `torch.save` writes a zip archive: `<name>/data.pkl` pickles the object (a state
dict of tensors, possibly nested in plain containers) and each tensor's storage is a raw
little-endian buffer `<name>/data/<key>`, referenced from the pickle by a persistent id
`("storage", StorageType, key, location, numel)`. A tensor is rebuilt by
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

This reader unpickles with an allow-list: plain containers, the tensor and parameter rebuild
functions and the storage types, nothing else (like `torch.load(weights_only=True)`), and turns
every tensor into a numpy array. Not read (a CheckpointFormatError says so): the pre-1.6 format,
TorchScript archives (OpenAI's original CLIP `.pt` files: re-save their `state_dict()`),
quantized or sparse tensors.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from multimodal_jax.errors import UserError


class CheckpointFormatError(UserError):
  """A file that is not a PyTorch checkpoint this reader understands; the message says why."""


_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  itemsize = storage.dtype.itemsize
  if not size:
    return np.array(storage[offset])
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  )
  return np.array(view)  # a contiguous copy: the storage may be shared by several tensors


def _rebuild_parameter(data, *unused) -> np.ndarray:
  return data


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("builtins", "set"): set,
  ("builtins", "frozenset"): frozenset,
  ("builtins", "slice"): slice,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointFormatError(
      f"{self._path} holds a pickled {module}.{name}, which is not a tensor or a plain container: only state "
      "dicts of tensors are read (save model.state_dict(), or convert the file to .safetensors)"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointFormatError(f"{self._path}: unknown persistent id {pid!r:.60} in the pickle")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"{self._path}: unsupported storage type {storage_type!r:.60}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, storage_type.dtype)
    storage = self._storages[key]
    return storage if storage.dtype == storage_type.dtype else storage.view(storage_type.dtype)


def load(path: str | os.PathLike) -> Any:
  """The object in a `torch.save` file, with every tensor as a numpy array (bfloat16 as
  `ml_dtypes.bfloat16`). CheckpointFormatError for anything else."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path} does not exist or is not a file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic.startswith(b"PK") and not zipfile.is_zipfile(path):
    raise CheckpointFormatError(f"{path} is a damaged or truncated zip archive: download or copy it again")
  if not zipfile.is_zipfile(path):
    raise CheckpointFormatError(
      f"{path} is not a PyTorch zip checkpoint (the format of torch.save since PyTorch 1.6): re-save it with a recent "
      "PyTorch or convert it to .safetensors"
    )
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
      if any(n.endswith("constants.pkl") for n in names) or not pickles:
        raise CheckpointFormatError(
          f"{path} is a TorchScript archive, not a state dict: load it with torch.jit.load and save its "
          "state_dict(), or convert it to .safetensors"
        )
      prefix = pickles[0][: -len("data.pkl")]
      byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
      if byteorder != "little":
        raise CheckpointFormatError(f"{path} was written on a big-endian machine, which this reader does not handle")
      with archive.open(pickles[0]) as f:
        return _Unpickler(f, archive, prefix, path).load()
  except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError) as e:
    raise CheckpointFormatError(f"{path} is damaged or truncated ({type(e).__name__}: {e})") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file; a missing, truncated or damaged file is one line."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path} does not exist or is not a file")
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0][:150]
    raise CheckpointFormatError(f"{path} is not a readable .safetensors file ({reason})") from None
