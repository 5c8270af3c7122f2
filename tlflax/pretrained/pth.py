"""Reads PyTorch `.pth` checkpoints into numpy, without torch and without risk.

Training machines have no torch, yet ImageNet weights ship as `torch.save`
files. Those files are pickles, and a pickle can run any code while loading,
so they are read here with an unpickler that resolves only the few globals a
plain state dict needs (tensor rebuild helpers, storage and dtype names,
`OrderedDict`). Anything else is refused before it can run.

Both on-disk formats are understood:

* zip (torch >= 1.6): `<archive>/data.pkl` holds the object, each storage is
  the record `<archive>/data/<key>`, and `<archive>/byteorder` says whether
  the bytes are little- or big-endian.
* legacy (torch < 1.6, still what many published weight files use): pickles
  in a row (magic number, protocol version, system info, the object, the
  sorted storage keys), then for each storage an int64 element count and its
  little-endian bytes.

Tensors come back as independent, C-contiguous numpy arrays of the same dtype
(bfloat16 and float8 via `ml_dtypes`), whatever their storage offset, strides
or sharing in the file.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Dict, NamedTuple, Optional

import ml_dtypes
import numpy as np

__all__ = ["PthError", "UnsafePthError", "load_state_dict", "read_pth"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # First pickle of a legacy file.
_PROTOCOL_VERSION = 1001
_WRAPPER_KEYS = ("state_dict", "model")
# A tensor with more elements than its storage is a broadcast (stride 0)
# view; materializing it copies data, so refuse absurd sizes from a bad file.
_MAX_EXPANDED_BYTES = 1 << 30
_HEADER_BYTES = 4096  # Enough for a legacy file's three header pickles.
_REDOWNLOAD = "Delete it and download it again."


class PthError(ValueError):
  """The file is missing, damaged or not a PyTorch checkpoint."""


class UnsafePthError(PthError, pickle.UnpicklingError):
  """The checkpoint asks to import something a weights file never needs."""


# ---------------------------------------------------------------------------
# What the pickle may name. Every allowed object is immutable (a NamedTuple),
# so a pickle's BUILD opcode cannot alter it for later loads.


class _StorageType(NamedTuple):
  """A `torch.<Type>Storage` class: storage elements of one dtype."""
  name: str
  dtype: np.dtype


class _DType(NamedTuple):
  """A `torch.<dtype>` object, passed to `_rebuild_tensor_v3`."""
  name: str
  dtype: np.dtype


class _Storage(NamedTuple):
  """One storage's raw bytes (None while only scanning a legacy file)."""
  dtype: np.dtype
  data: Optional[memoryview]
  big_endian: bool = False


class _Global(NamedTuple):
  """An allowed callable global; calling it calls `fn`."""
  name: str
  fn: Callable[..., Any]

  def __call__(self, *args):
    return self.fn(*args)


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
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
}
_UNTYPED = _StorageType("UntypedStorage", np.dtype(np.uint8))


def _tensor(storage, offset, size, stride, dtype=None) -> Optional[np.ndarray]:
  """Copies the strided view `size`/`stride` at `offset` out of `storage`."""
  if not isinstance(storage, _Storage):
    raise ValueError(f"a tensor refers to {type(storage).__name__}, "
                     "not to a storage")
  if storage.data is None:  # First pass over a legacy file: no bytes yet.
    return None
  dtype = np.dtype(storage.dtype if dtype is None else dtype)
  offset, size, stride = _int(offset), _ints(size), _ints(stride)
  if len(size) != len(stride):
    raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  end = (last + 1) * dtype.itemsize
  if end > len(storage.data):
    raise ValueError(f"a tensor needs {end} bytes of a storage of "
                     f"{len(storage.data)} bytes")
  if numel * dtype.itemsize > max(len(storage.data), _MAX_EXPANDED_BYTES):
    raise ValueError(f"a broadcast tensor of shape {size} is too large")
  raw = np.frombuffer(storage.data, np.uint8)[offset * dtype.itemsize:end]
  view = np.lib.stride_tricks.as_strided(
      raw.view(dtype), size, [s * dtype.itemsize for s in stride],
      writeable=False)
  out = np.array(view, order="C", copy=True)
  if storage.big_endian:
    _to_native(out)
  return out


def _int(value) -> int:
  """A non-negative Python int, or an error for anything else."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"expected a non-negative int, got {value!r}")
  return value


def _ints(values) -> tuple:
  if not isinstance(values, tuple):
    raise ValueError(f"expected a tuple of ints, got {values!r}")
  return tuple(_int(v) for v in values)


def _to_native(array: np.ndarray) -> None:
  """Byte-swaps a big-endian array in place (complex: each half alone)."""
  unit = array.dtype.itemsize // (2 if array.dtype.kind == "c" else 1)
  if unit > 1:
    array.view(f"u{unit}").byteswap(inplace=True)


def _check_metadata(metadata) -> None:
  """Tensor metadata only carries lazy conj/neg bits; weights never set them."""
  if metadata and any(metadata.values()):
    raise ValueError(f"tensors with metadata {metadata!r} are not supported")


def _rebuild_tensor(storage, offset, size, stride):
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  del requires_grad, backward_hooks
  _check_metadata(metadata)
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  del requires_grad, backward_hooks
  _check_metadata(metadata)
  if not isinstance(dtype, _DType):
    raise ValueError(f"expected a torch dtype, got {dtype!r}")
  return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  """An `nn.Parameter` is just its data here."""
  del requires_grad, backward_hooks, state
  return data


def _latin1_encode(text, encoding):
  """`_codecs.encode`, which protocol-2 pickles use to spell `bytes`."""
  if not isinstance(text, str) or encoding != "latin1":
    raise ValueError(f"refused _codecs.encode({text!r}, {encoding!r})")
  return text.encode("latin1")


def _allowed_globals() -> Dict[str, Any]:
  """Maps 'module.name' to what the unpickler returns for it."""
  allowed: Dict[str, Any] = {
      "collections.OrderedDict": collections.OrderedDict,
      "_codecs.encode": _Global("encode", _latin1_encode),
      "torch.storage.UntypedStorage": _UNTYPED,
      "torch.UntypedStorage": _UNTYPED,
  }
  rebuilds = {
      "_rebuild_tensor": _rebuild_tensor,
      "_rebuild_tensor_v2": _rebuild_tensor_v2,
      "_rebuild_tensor_v3": _rebuild_tensor_v3,
      "_rebuild_parameter": _rebuild_parameter,
      "_rebuild_parameter_with_state": _rebuild_parameter,
  }
  for name, fn in rebuilds.items():
    allowed[f"torch._utils.{name}"] = _Global(name, fn)
  for name, dtype in _STORAGE_DTYPES.items():
    for module in ("torch", "torch.cuda"):  # Old files name CUDA storages.
      allowed[f"{module}.{name}"] = _StorageType(name, np.dtype(dtype))
  for name, dtype in _TORCH_DTYPES.items():
    allowed[f"torch.{name}"] = _DType(name, np.dtype(dtype))
  return allowed


_ALLOWED = _allowed_globals()


# ---------------------------------------------------------------------------
# Unpicklers.

StorageLoader = Callable[[str, _StorageType, int, Any], _Storage]


class _PlainUnpickler(pickle.Unpickler):
  """Loads plain data (ints, strs, dicts, lists) and nothing that can run."""

  def __init__(self, file: BinaryIO, path: str):
    super().__init__(file, encoding="utf-8")
    self._path = path

  def find_class(self, module: str, name: str):
    raise _refused(self._path, module, name)

  def persistent_load(self, pid):
    raise PthError(f"{self._path}: unexpected storage reference {pid!r} "
                   "outside the checkpoint's main object.")


class _WeightsUnpickler(_PlainUnpickler):
  """Loads a state dict: only `_ALLOWED` globals; storages via `loader`."""

  def __init__(self, file: BinaryIO, path: str, loader: StorageLoader):
    super().__init__(file, path)
    self._loader = loader

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[f"{module}.{name}"]
    except KeyError:
      raise _refused(self._path, module, name) from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise ValueError(f"unknown persistent id {pid!r}")
    tag = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if tag == "module":
      raise UnsafePthError(
          f"{self._path} holds a whole pickled nn.Module, not a state dict; "
          "refusing to import its code. Save `model.state_dict()` instead.")
    if tag != "storage" or len(pid) not in (5, 6):
      raise ValueError(f"unknown persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
      raise ValueError(f"malformed storage reference {pid!r}")
    return self._loader(key, storage_type, _int(numel), view)


def _refused(path: str, module: str, name: str) -> UnsafePthError:
  return UnsafePthError(
      f"{path}: refused to load the global `{module}.{name}`. A weights-only "
      "checkpoint needs only tensors, storages and dtypes, so nothing from "
      "this file was run. Only load it with torch (weights_only=False) if you "
      "trust its source.")


def _load_plain(file: BinaryIO, path: str) -> Any:
  return _PlainUnpickler(file, path).load()


def _unpickle(file: BinaryIO, path: str, loader: StorageLoader) -> Any:
  return _WeightsUnpickler(file, path, loader).load()


# ---------------------------------------------------------------------------
# The zip format.


def _read_zip(path: str, file: BinaryIO) -> Any:
  """Reads a torch >= 1.6 checkpoint: one pass over `<archive>/data.pkl`."""
  try:
    archive = zipfile.ZipFile(file)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise PthError(f"{path} starts like a zip checkpoint but its zip "
                   f"directory is unreadable ({e}); the file is truncated or "
                   f"damaged. {_REDOWNLOAD}") from e
  with archive:
    prefix = _archive_prefix(path, archive)
    big_endian = _is_big_endian(path, archive, prefix)
    storages: Dict[str, _Storage] = {}

    def loader(key, storage_type, numel, view):
      del view  # Zip files never store storage views.
      if key not in storages:
        nbytes = numel * storage_type.dtype.itemsize
        data = _zip_record(path, archive, f"{prefix}data/{key}", nbytes)
        storages[key] = _Storage(storage_type.dtype, data, big_endian)
      return storages[key]._replace(dtype=storage_type.dtype)

    pickled = _zip_record(path, archive, f"{prefix}data.pkl")
    return _unpickle(io.BytesIO(pickled), path, loader)


def _archive_prefix(path: str, archive: zipfile.ZipFile) -> str:
  """The archive's top folder (its name varies), with a trailing slash."""
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise PthError(f"{path} is a zip file but not a PyTorch checkpoint (no "
                   "single `<archive>/data.pkl` record).")
  prefix = pickles[0][:-len("data.pkl")]
  if f"{prefix}constants.pkl" in names:
    raise PthError(f"{path} is a TorchScript archive (torch.jit.save), not "
                   "a state dict. Export `model.state_dict()` with torch.save.")
  return prefix


def _is_big_endian(path: str, archive: zipfile.ZipFile, prefix: str) -> bool:
  """Reads `<archive>/byteorder`; files without one are little-endian."""
  if f"{prefix}byteorder" not in archive.namelist():
    return False
  order = _zip_record(path, archive, f"{prefix}byteorder").tobytes()
  if order not in (b"little", b"big"):
    raise PthError(f"{path}: unknown byte order {order!r}.")
  return order == b"big"


def _zip_record(path: str, archive: zipfile.ZipFile, name: str,
                nbytes: Optional[int] = None) -> memoryview:
  """A record's bytes, checked against the size the pickle expects."""
  try:
    info = archive.getinfo(name)
    if info.CRC == 0 and info.file_size and info.compress_type == 0:
      data = _stored_bytes(archive, info)  # Saved with compute_crc32=False.
    else:
      data = archive.read(info)
  except KeyError:
    raise PthError(f"{path} has no record `{name}`; the checkpoint is "
                   f"incomplete. {_REDOWNLOAD}") from None
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise PthError(f"{path}: record `{name}` is damaged ({e}). "
                   f"{_REDOWNLOAD}") from e
  if nbytes is not None and len(data) < nbytes:
    raise PthError(f"{path}: record `{name}` has {len(data)} bytes but its "
                   f"tensor needs {nbytes}. {_REDOWNLOAD}")
  return memoryview(data)


def _stored_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
  """An uncompressed record's bytes, read past the local header, no CRC."""
  file = archive.fp
  file.seek(info.header_offset)
  header = file.read(30)
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    raise zipfile.BadZipFile(f"bad local header for {info.filename}")
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  file.seek(info.header_offset + 30 + name_len + extra_len)
  data = file.read(info.file_size)
  if len(data) != info.file_size:
    raise EOFError(f"{info.filename} is cut short")
  return data


# ---------------------------------------------------------------------------
# The legacy format.


def _read_legacy(path: str, file: BinaryIO) -> Any:
  """Reads a pre-1.6 checkpoint.

  The storages' bytes follow the pickled object, so the object is unpickled
  twice: once to learn each storage's dtype and size, once (after reading
  the bytes) to build the arrays. The pickle itself is small.
  """
  _check_legacy_header(path, file)
  start = file.tell()
  types: Dict[str, tuple] = {}

  def scan(key, storage_type, numel, view):
    types.setdefault(key, (storage_type.dtype, numel))
    return _Storage(storage_type.dtype, None)

  _unpickle(file, path, scan)
  keys = _load_plain(file, path)
  if not isinstance(keys, list) or set(keys) != set(types):
    raise PthError(f"{path}: the storage list does not match the tensors; "
                   f"the file is damaged. {_REDOWNLOAD}")
  data = {key: _read_legacy_storage(path, file, key, *types[key])
          for key in keys}
  file.seek(start)
  return _unpickle(file, path, _legacy_loader(data))


def _check_legacy_header(path: str, file: BinaryIO) -> None:
  """Checks the magic number and protocol version; skips the system info.

  The three small pickles are parsed from the first few KiB only, so random
  bytes cannot make the unpickler allocate a huge buffer.
  """
  head = io.BytesIO(file.read(_HEADER_BYTES))
  try:
    magic = _load_plain(head, path)
  except UnsafePthError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise PthError(f"{path} is not a PyTorch checkpoint (neither a zip "
                   f"archive nor a legacy torch.save file: {e!r}). If it "
                   f"should be one, it is damaged. {_REDOWNLOAD}") from e
  if magic != _MAGIC_NUMBER:
    raise PthError(f"{path} is a pickle but not a PyTorch checkpoint (no "
                   "torch.save magic number).")
  try:
    version = _load_plain(head, path)
    _load_plain(head, path)  # sys_info; legacy data is always little-endian.
  except (EOFError, pickle.UnpicklingError) as e:
    raise _truncated(path, f"header: {e}") from e
  if version != _PROTOCOL_VERSION:
    raise PthError(f"{path}: unsupported legacy protocol version {version!r}.")
  file.seek(head.tell())


def _read_legacy_storage(path: str, file: BinaryIO, key: str,
                         dtype: np.dtype, numel: int) -> memoryview:
  """One storage: an int64 element count, then that many elements."""
  head = file.read(8)
  if len(head) != 8:
    raise _truncated(path, f"storage {key!r} is missing")
  (count,) = struct.unpack("<q", head)
  if count != numel:
    raise PthError(f"{path}: storage {key!r} holds {count} elements but its "
                   f"tensors expect {numel}; the file is damaged. "
                   f"{_REDOWNLOAD}")
  nbytes = count * dtype.itemsize
  remaining = os.fstat(file.fileno()).st_size - file.tell()
  if nbytes > remaining:
    raise _truncated(path, f"storage {key!r} needs {nbytes} bytes, only "
                     f"{remaining} remain")
  buffer = bytearray(nbytes)
  file.readinto(buffer)
  return memoryview(buffer)


def _legacy_loader(data: Dict[str, memoryview]) -> StorageLoader:
  """Serves storages, and the (pre-1.0) views into them, from `data`."""
  views: Dict[str, _Storage] = {}

  def loader(key, storage_type, numel, view):
    del numel
    dtype = storage_type.dtype
    if view is None:
      return _Storage(dtype, data[key])
    view_key, offset, size = view
    if view_key not in views:
      start = _int(offset) * dtype.itemsize
      stop = start + _int(size) * dtype.itemsize
      if stop > len(data[key]):
        raise ValueError(f"storage view {view_key!r} overruns its storage")
      views[view_key] = _Storage(dtype, data[key][start:stop])
    return views[view_key]

  return loader


def _truncated(path: str, detail: str) -> PthError:
  return PthError(f"{path} is truncated or damaged ({detail}); the download "
                  f"or copy was probably cut short. {_REDOWNLOAD}")


# ---------------------------------------------------------------------------
# Public API.


def read_pth(path: str | os.PathLike) -> Any:
  """Unpickles a `torch.save` file, tensors as numpy arrays, running no code.

  Args:
    path: a `.pth`/`.pt` file written by `torch.save`, zip or legacy format.

  Returns:
    The saved object (usually a dict or `OrderedDict`), with every tensor
    or `nn.Parameter` replaced by an independent C-contiguous numpy array.

  Raises:
    UnsafePthError: the file names a global a weights file does not need.
    PthError: the file is missing, empty, truncated or not a checkpoint.
  """
  path = os.fspath(path)
  _check_file(path)
  with open(path, "rb") as file:
    head = file.read(512)
    file.seek(0)
    try:
      if head.startswith(b"PK\x03\x04"):
        return _read_zip(path, file)
      if head[257:262] == b"ustar":
        raise PthError(f"{path} uses the tar format of torch < 0.4, which "
                       "is not supported. Re-save it with a newer torch.")
      return _read_legacy(path, file)
    except PthError:
      raise
    except (EOFError, pickle.UnpicklingError, struct.error) as e:
      raise _truncated(path, f"{type(e).__name__}: {e}") from e
    except Exception as e:  # pylint: disable=broad-except
      raise PthError(f"{path} is damaged or not a weights file ({e!r}). "
                     f"{_REDOWNLOAD}") from e


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    what = "a directory" if os.path.isdir(path) else "missing"
    raise PthError(f"{path} is {what}, not a checkpoint file. Check the path "
                   "or download the weights.")
  if os.path.getsize(path) == 0:
    raise PthError(f"{path} is empty (0 bytes), e.g. from an interrupted "
                   f"download. {_REDOWNLOAD}")


def load_state_dict(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """Reads the flat `{name: array}` state dict of a PyTorch checkpoint.

  Checkpoints that wrap the weights as `{"state_dict": ...}` or
  `{"model": ...}` (with training state beside them) are unwrapped.

  Args:
    path: a `.pth`/`.pt` file written by `torch.save`, zip or legacy format.

  Returns:
    A new dict, keys exactly as in the file and in its order, values
    C-contiguous numpy arrays with torch's dtype and shape.

  Raises:
    UnsafePthError: the file names a global a weights file does not need.
    PthError: the file is missing, damaged, or holds no flat state dict.
  """
  path = os.fspath(path)
  obj = _unwrap(read_pth(path))
  if not _is_state_dict(obj) or not obj:
    raise PthError(f"{path} does not hold a state dict of tensors (found "
                   f"{_describe(obj)}).")
  return dict(obj)


def _unwrap(obj: Any) -> Any:
  """Follows `state_dict`/`model` keys down to the dict of arrays."""
  for _ in range(len(_WRAPPER_KEYS) + 1):
    if not isinstance(obj, dict) or _is_state_dict(obj):
      break
    key = next((k for k in _WRAPPER_KEYS if k in obj), None)
    if key is None:
      break
    obj = obj[key]
  return obj


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _describe(obj: Any) -> str:
  if isinstance(obj, dict):
    kinds = sorted({type(v).__name__ for v in obj.values()})
    return f"a dict with keys {list(obj)[:8]} and values {kinds}"
  return type(obj).__name__
