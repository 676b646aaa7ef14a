"""Reads PyTorch `.pth` files (torch.save) into NumPy arrays, without PyTorch, tensors only.

A `.pth` file is a pickle, and unpickling may call any importable function (`os.system`,
`builtins.eval`): opening an untrusted checkpoint with plain `pickle` runs its code.
`torch.load(weights_only=True)` guards against that with an allow-list of globals, but it needs
PyTorch, which we keep out of a user's install. This module is such an allow-list without torch.
The pickle may build plain containers (dict, list, tuple, str, int, float, bool, None, from
opcodes alone), `collections.OrderedDict`, and tensors through `torch._utils._rebuild_tensor_v2`,
`_rebuild_tensor` or `_rebuild_parameter` over the typed storages in `_STORAGE_DTYPES`
(`torch.FloatStorage`, ...). Any other global (an `nn.Module` class, a NumPy reconstructor,
`os.system`) is refused before it is called, with an error naming it: only state dicts of tensors
are read.

Two layouts are read:
- zip (torch.save's default since torch 1.6): `<root>/data.pkl`, each storage's bytes in
  `<root>/data/<key>`, their byte order in `<root>/byteorder` (little when absent, as in torch).
- legacy (`_use_new_zipfile_serialization=False`, as many ImageNet weights are): pickles in a row
  (magic number, protocol version, sys info, the object, the sorted storage keys), then per key an
  int64 element count and the storage's bytes. torch writes and reads that count and those bytes
  little-endian whatever the sys info says, and so do we.
Not read: TorchScript archives, the pre-1.0 tar layout, complex, quantized or sparse tensors.

Every tensor comes back as its own contiguous, writable NumPy array (bfloat16 as
`ml_dtypes.bfloat16`), also where torch would share one storage between tensors.
"""
import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO, Callable

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<name> storage classes -> the dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# Reads the storage `key` of `numel` elements of `dtype` as a 1-D native-order array; returns
# None in the legacy format's first pass, which only learns the storages' dtypes and sizes.
_ReadStorage = Callable[[str, np.dtype, int], np.ndarray | None]


class PthError(ValueError):
  """A `.pth` file that is not a torch.save file, is damaged, or holds more than tensors."""


class _StorageType:
  """What a `torch.<X>Storage` global resolves to: a dtype, and nothing a pickle can call."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _Storage:
  """A flat run of `numel` elements of `dtype`; `data` is None while only scanning."""
  __slots__ = ("dtype", "numel", "data")

  def __init__(self, dtype: np.dtype, numel: int, data: np.ndarray | None):
    self.dtype, self.numel, self.data = dtype, numel, data


def _is_int(value: Any) -> bool:
  # Not isinstance: a bool is no size or offset.
  return type(value) is int  # pylint: disable=unidiomatic-typecheck


class _PlainUnpickler(pickle.Unpickler):
  """Unpickles containers and scalars only: every global and persistent id is refused."""

  def __init__(self, file: BinaryIO, path: os.PathLike):
    # Python 2 strings decode as UTF-8, as torch.load does.
    super().__init__(file, encoding="utf-8")
    self.path = path

  def error(self, message: str) -> PthError:
    return PthError(f"{self.path}: {message}")

  def find_class(self, module: str, name: str) -> Any:
    raise self.error(
        f"refused to load the global {module}.{name}: only state dicts of tensors (with plain "
        "containers, numbers and strings) are read, since unpickling anything else could run "
        "code. Re-save the checkpoint as model.state_dict() or convert it to .npz.")

  def persistent_load(self, pid: Any) -> Any:
    raise self.error(f"unexpected persistent id {pid!r:.100} outside the main pickle")


class _TensorUnpickler(_PlainUnpickler):
  """Unpickles a torch.save pickle, its tensors as NumPy arrays, refusing all other globals."""

  def __init__(self, file: BinaryIO, path: os.PathLike, read_storage: _ReadStorage):
    super().__init__(file, path)
    self._read_storage = read_storage
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    allowed = {("collections", "OrderedDict"): collections.OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
               ("torch._utils", "_rebuild_tensor"): self._tensor,
               ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter}
    if (module, name) in allowed:
      return allowed[module, name]
    return super().find_class(module, name)

  def persistent_load(self, pid: Any) -> _Storage:
    """('storage', type, key, location, numel[, view]) -> that storage (or a view of it)."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise self.error(f"unknown persistent id {pid!r:.100}: only tensor storages are read")
    _, storage_type, key, _, numel, *view = pid
    if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_int(numel)
            and numel >= 0):
      raise self.error(f"malformed storage id {pid!r:.100}")
    dtype = storage_type.dtype
    storage = self._storages.get(key)
    if storage is None:
      storage = _Storage(dtype, numel, self._read_storage(key, dtype, numel))
      self._storages[key] = storage
    elif (storage.dtype, storage.numel) != (dtype, numel):
      raise self.error(f"storage {key} is used as {storage.numel} x {storage.dtype} and as "
                       f"{numel} x {dtype}")
    return self._storage_view(storage, key, view[0]) if view and view[0] is not None else storage

  def _storage_view(self, storage: _Storage, key: str, view: Any) -> _Storage:
    """A legacy storage view (view key, element offset, element count) of `storage`."""
    if not (isinstance(view, tuple) and len(view) == 3 and _is_int(view[1])
            and _is_int(view[2]) and 0 <= view[1] and 0 <= view[2]
            and view[1] + view[2] <= storage.numel):
      raise self.error(f"storage view {view!r:.100} does not fit in storage {key} of "
                       f"{storage.numel} elements")
    _, offset, numel = view
    data = None if storage.data is None else storage.data[offset:offset + numel]
    return _Storage(storage.dtype, numel, data)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, metadata=None) -> np.ndarray:
    del requires_grad, backward_hooks  # only for autograd; hooks would need refused globals
    if metadata:
      raise self.error(f"a tensor with metadata {metadata!r:.100} (a conjugate or negative "
                       "view) is not supported")
    return self._tensor(storage, storage_offset, size, stride)

  def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> np.ndarray:
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
      raise self.error("an nn.Parameter without a tensor")
    return data

  def _tensor(self, storage, offset, size, stride) -> np.ndarray:
    """A contiguous copy of the view `size`/`stride`/`offset` (in elements) of `storage`."""
    if not (isinstance(storage, _Storage) and _is_int(offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(_is_int(n) and n >= 0 for n in size + stride) and offset >= 0):
      raise self.error(f"malformed tensor (offset {offset!r:.50}, shape {size!r:.100}, "
                       f"strides {stride!r:.100})")
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
      raise self.error(f"a tensor of shape {size}, strides {stride} at offset {offset} reaches "
                       f"past its storage of {storage.numel} elements")
    if storage.data is None:  # first pass: a stand-in of the right shape, no memory
      return np.broadcast_to(np.zeros((), storage.dtype), size)
    if not math.prod(size):
      return np.zeros(size, storage.dtype)
    view = np.lib.stride_tricks.as_strided(
        storage.data[offset:], size, [s * storage.dtype.itemsize for s in stride], writeable=False)
    return np.array(view, order="C")


def _as_array(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
  """Storage bytes in `byteorder` ("little"/"big") -> a 1-D array of `dtype`, native order."""
  # Swapping as unsigned ints of the same width also serves ml_dtypes.bfloat16.
  words = np.frombuffer(raw, np.dtype(f"u{dtype.itemsize}"))
  if byteorder != sys.byteorder and dtype.itemsize > 1:
    words = words.byteswap()
  return words.view(dtype)


def _read_exact(f: BinaryIO, size: int, path: os.PathLike, what: str) -> bytes:
  data = f.read(size)
  if len(data) != size:
    raise PthError(f"{path}: truncated file: {what} needs {size} bytes, {len(data)} are left")
  return data


def _load_zip(f: BinaryIO, path: os.PathLike) -> Any:
  """Reads the zip layout: `<root>/data.pkl` and the storages in `<root>/data/<key>`."""
  try:
    archive = zipfile.ZipFile(f)
  except zipfile.BadZipFile as e:
    raise PthError(f"{path}: a damaged or truncated zip archive ({e})") from e
  with archive:
    # torch.save puts every record under one folder, named after the file when it was saved.
    root = next(iter(archive.namelist()), "").split("/")[0]
    names = set(archive.namelist())
    if f"{root}/constants.pkl" in names:
      raise PthError(f"{path}: a TorchScript archive (torch.jit.save), not a state dict; "
                     "save model.state_dict() with torch.save instead")
    if f"{root}/data.pkl" not in names:
      raise PthError(f"{path}: a zip archive without {root}/data.pkl, not written by torch.save")
    byteorder = "little"
    if f"{root}/byteorder" in names:
      byteorder = archive.read(f"{root}/byteorder").decode("ascii", "replace")
      if byteorder not in ("little", "big"):
        raise PthError(f"{path}: unknown byte order {byteorder!r} in {root}/byteorder")

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      name = f"{root}/data/{key}"
      if name not in names:
        raise PthError(f"{path}: the storage record {name} is missing")
      if (size := archive.getinfo(name).file_size) != numel * dtype.itemsize:
        raise PthError(f"{path}: the storage record {name} has {size} bytes, expected "
                       f"{numel} x {dtype} = {numel * dtype.itemsize}")
      return _as_array(archive.read(name), dtype, byteorder)

    pickled = io.BytesIO(archive.read(f"{root}/data.pkl"))
    return _TensorUnpickler(pickled, path, read_storage).load()


def _storage_offsets(f: BinaryIO, path: os.PathLike,
                     declared: dict[str, tuple[np.dtype, int]]) -> dict[str, int]:
  """Walks the legacy storage records after the key list: storage key -> file offset of its bytes.

  `declared` (key -> dtype, element count) comes from the main pickle; each record must match.
  """
  keys = _PlainUnpickler(f, path).load()
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
    raise PthError(f"{path}: expected the list of storage keys after the main pickle")
  file_size = os.fstat(f.fileno()).st_size
  offsets = {}
  for key in keys:
    if key not in declared:
      raise PthError(f"{path}: the storage record {key} belongs to no tensor")
    dtype, numel = declared[key]
    (count,) = struct.unpack("<q", _read_exact(f, 8, path, f"the size of storage {key}"))
    if count != numel:
      raise PthError(f"{path}: storage {key} has {count} elements, its tensors expect {numel}")
    offsets[key] = f.tell()
    if offsets[key] + numel * dtype.itemsize > file_size:
      raise PthError(f"{path}: truncated file: storage {key} needs {numel * dtype.itemsize} "
                     f"bytes, {file_size - offsets[key]} are left")
    f.seek(numel * dtype.itemsize, os.SEEK_CUR)
  if missing := sorted(declared.keys() - offsets.keys()):
    raise PthError(f"{path}: no storage record for key(s) {', '.join(missing)}")
  return offsets


def _load_legacy(f: BinaryIO, path: os.PathLike) -> Any:
  """Reads the legacy layout: the header pickles, the object, then the storage records.

  The storages' bytes follow the pickle that uses them, and their sizes in bytes depend on the
  dtypes named inside it; so a first pass unpickles with stand-in tensors to learn the dtypes and
  where each record lies, and a second pass builds the tensors from those records.
  """
  try:
    magic = _PlainUnpickler(f, path).load()
  except Exception as e:  # garbage makes the unpickler raise almost any error type
    raise PthError(f"{path}: not a PyTorch file: neither a zip archive nor a legacy torch.save "
                   "file (nor the start of one)") from e
  if magic != _LEGACY_MAGIC:
    raise PthError(f"{path}: not a PyTorch file: a pickle without torch.save's magic number")
  if (version := _PlainUnpickler(f, path).load()) != _LEGACY_PROTOCOL:
    raise PthError(f"{path}: unknown legacy torch.save protocol version {version!r:.50}")
  if not isinstance(_PlainUnpickler(f, path).load(), dict):
    raise PthError(f"{path}: expected the sys info dict after the protocol version")
  start = f.tell()
  declared = {}

  def declare(key: str, dtype: np.dtype, numel: int) -> None:
    declared[key] = (dtype, numel)

  _TensorUnpickler(f, path, declare).load()
  end = f.tell()
  offsets = _storage_offsets(f, path, declared)
  f.seek(start)
  pickled = io.BytesIO(_read_exact(f, end - start, path, "the main pickle"))

  def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    f.seek(offsets[key])
    return _as_array(_read_exact(f, numel * dtype.itemsize, path, f"storage {key}"), dtype,
                     "little")

  return _TensorUnpickler(pickled, path, read_storage).load()


def load(path: str | os.PathLike) -> Any:
  """Reads a torch.save file: the pickled structure, every tensor as a NumPy array.

  Raises PthError (a ValueError) naming `path` for a file that is not a torch.save file, is
  damaged or truncated, or needs a global outside the allow-list (see the module docstring).
  """
  with open(path, "rb") as f:
    head = f.read(512)
    f.seek(0)
    if head[257:262] == b"ustar":
      raise PthError(f"{path}: the tar layout of torch before 1.0 is not read; load and re-save "
                     "it with a recent torch")
    try:
      return _load_zip(f, path) if head.startswith(b"PK\x03\x04") else _load_legacy(f, path)
    except (PthError, OSError):
      raise
    except Exception as e:  # a damaged pickle or zip raises almost any built-in error type
      raise PthError(f"{path}: damaged or truncated PyTorch file "
                     f"({type(e).__name__}: {e})") from e
