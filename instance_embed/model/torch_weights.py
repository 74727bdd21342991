"""Reading PyTorch `torch.save` files of tensors without PyTorch.

A `.pth` file is a pickle whose tensors point at raw storages kept beside it. Unpickling
one with `pickle` would run whatever the file names (`os.system` included), so this
reader uses a restricted unpickler that builds nothing but dicts, lists, tuples, numbers,
strings and tensors: the only globals it resolves are `collections.OrderedDict`, torch's
tensor-rebuilding functions and its storage types. Anything else is refused with an error
naming the file and the global.

Both layouts `torch.save` has written are understood:
- the zip layout (torch >= 1.6): `<name>/data.pkl` plus one entry `<name>/data/<key>`
  per storage, raw little-endian bytes;
- the legacy layout (torch < 1.6): consecutive pickles (magic number, protocol version,
  system info, the object, the list of storage keys), then each storage as an int64
  element count followed by its raw bytes, in the order of that list.

`read_state_dict(path)` returns the file's tensors as NumPy arrays, keyed by their state
dict names.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Mapping, Tuple

import numpy as np

# `torch.save`'s legacy layout starts with this pickled integer.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# Storage type name -> (NumPy dtype of its elements, bytes per element). bfloat16 has no
# NumPy dtype: its storages are read as uint16 and widened to float32.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchFileError(ValueError):
    """A `.pth` file that cannot be read as tensors; the message names the file."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read once the pickle is done."""

    key: str
    storage_type: _StorageType
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """What `_rebuild_tensor_v2` was asked to build: a strided view of a storage."""

    storage: _StorageRef
    offset: int
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor is built from something that is not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("a parameter is built from something that is not a tensor")
    return data


# The globals a file of tensors may name, and what each becomes here.
_ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles only containers, scalars and tensors (see the module docstring)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is not part of a file of tensors "
                "(refused: unpickling it could run arbitrary code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, _, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key!r} has an unknown type")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError(f"storage {key!r} is a view of another storage "
                                         "(written by a very old torch; not supported)")
        return _StorageRef(str(key), storage_type, int(numel))


def _load_pickle(stream: BinaryIO) -> Any:
    return _TensorUnpickler(stream).load()


def _storage_array(ref: _StorageRef, raw: bytes, path: str) -> np.ndarray:
    dtype = ref.storage_type.dtype
    if len(raw) < ref.numel * dtype.itemsize:
        raise TorchFileError(
            f"{path}: storage {ref.key} holds {len(raw)} bytes, fewer than its "
            f"{ref.numel} elements of {dtype.itemsize} bytes (is the file truncated?)")
    array = np.frombuffer(raw, dtype=dtype, count=ref.numel)
    if ref.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _materialise(ref: _TensorRef, storage: np.ndarray, name: str, path: str) -> np.ndarray:
    shape, strides = ref.shape, ref.strides
    if len(shape) != len(strides) or any(s < 0 for s in shape + strides) or ref.offset < 0:
        raise TorchFileError(f"{path}: tensor {name!r} has an invalid size or stride")
    last = ref.offset + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else -1
    if last >= storage.size:
        raise TorchFileError(
            f"{path}: tensor {name!r} of shape {shape} reaches element {last} of a "
            f"storage of {storage.size} (is the file corrupt?)")
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:] if all(shape) else storage[:0], shape=shape,
        strides=tuple(s * storage.itemsize for s in strides), writeable=False)
    return np.array(view)


def _flatten(obj: Any, path: str) -> Dict[str, _TensorRef]:
    """State-dict name -> tensor of a (possibly nested, e.g. {"state_dict": ...}) dict."""
    if not isinstance(obj, Mapping):
        raise TorchFileError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping from "
            "names to tensors)")
    tensors: Dict[str, _TensorRef] = {}
    for key, value in obj.items():
        if isinstance(value, _TensorRef):
            tensors[str(key)] = value
        elif isinstance(value, Mapping):
            tensors.update({f"{key}.{k}": v for k, v in _flatten(value, path).items()})
    return tensors


def _read_zip(path: str) -> Tuple[Any, Callable[[_StorageRef], bytes]]:
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise TorchFileError(f"{path} is a zip file without exactly one data.pkl: not a "
                             "torch.save file")
    prefix = pickles[0][: -len("data.pkl")]
    obj = _load_pickle(io.BytesIO(archive.read(pickles[0])))

    def storage_bytes(ref: _StorageRef) -> bytes:
        entry = f"{prefix}data/{ref.key}"
        if entry not in names:
            raise TorchFileError(f"{path} lacks the storage {entry}")
        return archive.read(entry)

    return obj, storage_bytes


def _read_legacy(path: str, stream: BinaryIO) -> Tuple[Any, Callable[[_StorageRef], bytes]]:
    magic = _load_pickle(stream)
    if magic != _LEGACY_MAGIC_NUMBER:
        raise TorchFileError(f"{path} is neither a zip nor a legacy torch.save file")
    version = _load_pickle(stream)
    if version != _LEGACY_PROTOCOL_VERSION:
        raise TorchFileError(f"{path} has torch.save protocol {version!r}, not "
                             f"{_LEGACY_PROTOCOL_VERSION}")
    system = _load_pickle(stream)
    if isinstance(system, Mapping) and not system.get("little_endian", True):
        raise TorchFileError(f"{path} was written on a big-endian machine (not supported)")
    obj = _load_pickle(stream)
    keys = _load_pickle(stream)
    if not isinstance(keys, list):
        raise TorchFileError(f"{path}: the list of storages is missing")
    refs = {}

    def collect(value):
        if isinstance(value, _TensorRef):
            refs[value.storage.key] = value.storage
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)

    collect(obj)
    raw = {}
    for key in keys:
        header = stream.read(8)
        if len(header) < 8:
            raise TorchFileError(f"{path} ends before storage {key} (is the file truncated?)")
        (numel,) = struct.unpack("<q", header)
        ref = refs.get(str(key))
        itemsize = ref.storage_type.dtype.itemsize if ref is not None else None
        if itemsize is None:
            raise TorchFileError(f"{path}: storage {key} is listed but no tensor uses it")
        data = stream.read(numel * itemsize)
        if len(data) < numel * itemsize:
            raise TorchFileError(f"{path} ends inside storage {key} (is the file truncated?)")
        raw[str(key)] = data

    def storage_bytes(ref: _StorageRef) -> bytes:
        if ref.key not in raw:
            raise TorchFileError(f"{path} lacks the storage {ref.key}")
        return raw[ref.key]

    return obj, storage_bytes


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a `torch.save` file, as NumPy arrays.

    Args:
      path: A file written by `torch.save` of a state dict (or of a dict holding one).

    Returns:
      State-dict name -> array (float32 for float and bfloat16 tensors, the storage's
      dtype otherwise), in the file's order. Nested dicts are flattened with dots.

    Raises:
      FileNotFoundError: if `path` does not exist.
      TorchFileError: naming the file, if it is truncated, corrupt, not a `torch.save`
        file, or names anything but tensors and containers.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            obj, storage_bytes = _read_zip(path)
        else:
            with open(path, "rb") as stream:
                obj, storage_bytes = _read_legacy(path, stream)
        refs = _flatten(obj, path)
        storages: Dict[str, np.ndarray] = {}
        arrays = {}
        for name, ref in refs.items():
            key = ref.storage.key
            if key not in storages:
                storages[key] = _storage_array(ref.storage, storage_bytes(ref.storage), path)
            arrays[name] = _materialise(ref, storages[key], name, path)
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error,
            ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError) as e:
        detail = str(e) or type(e).__name__
        raise TorchFileError(f"{path} cannot be read as a torch.save file of tensors: "
                             f"{detail}") from None
    if not arrays:
        raise TorchFileError(f"{path} holds no tensors")
    return arrays
