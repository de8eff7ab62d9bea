"""Reads PyTorch ``.pth`` state dicts into numpy without PyTorch, executing no pickled code.

Both serialisations are handled: the zip format (PyTorch >= 1.6: ``archive/data.pkl`` plus one
file per storage) and the legacy stream (magic number, protocol, system info, the pickle, the
storage keys, then each storage as an 8-byte element count and raw little-endian data). The
unpickler resolves only the handful of names a state dict needs (``OrderedDict``, the tensor
rebuild function, storage types) and refuses anything else.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


class _StorageType:
    def __init__(self, name: str):
        if name == "BFloat16Storage":
            self.dtype = np.dtype(_bfloat16())
        elif name in _STORAGE_DTYPES:
            self.dtype = np.dtype(_STORAGE_DTYPES[name])
        else:
            raise pickle.UnpicklingError(f"unsupported tensor storage type torch.{name}")


class _Tensor:
    """A tensor whose storage may be filled in after unpickling (the legacy format)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self, storages) -> np.ndarray:
        key, view_offset = self.storage
        flat = storages[key][view_offset:]
        itemsize = flat.dtype.itemsize
        if not self.size:
            return flat[self.offset : self.offset + 1].reshape(()).copy()
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride], writeable=False
        )
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _Tensor(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, persistent):
        super().__init__(stream)
        self._persistent = persistent

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a state dict")

    def persistent_load(self, pid):
        return self._persistent(pid)


def _resolve(tree, storages):
    if isinstance(tree, _Tensor):
        return tree.materialise(storages)
    if isinstance(tree, dict):
        return {key: _resolve(value, storages) for key, value in tree.items()}
    return tree


def _load_zip(path: str):
    with zipfile.ZipFile(path) as archive:
        pickle_name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pickle_name[: -len("data.pkl")]
        storages, kinds = {}, {}

        def persistent(pid):
            _, storage_type, key, _, numel = pid[:5]
            kinds[key] = (storage_type.dtype, numel)
            return (key, 0)

        tree = _Unpickler(io.BytesIO(archive.read(pickle_name)), persistent).load()
        for key, (dtype, numel) in kinds.items():
            storages[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype, count=numel)
    return tree, storages


def _load_legacy(path: str):
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        kinds = {}

        def persistent(pid):
            if pid[0] != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {pid[0]!r}")
            storage_type, root_key, _, numel, view = pid[1:6]
            kinds[root_key] = (storage_type.dtype, numel)
            return (root_key, view[1] if view else 0)

        tree = _Unpickler(f, persistent).load()
        keys = pickle.load(f)
        storages = {}
        for key in keys:
            dtype, _ = kinds[key]
            (count,) = struct.unpack("<q", f.read(8))
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype, count=count)
    return tree, storages


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} of a ``torch.save``-d state dict."""
    tree, storages = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    if isinstance(tree, dict) and "state_dict" in tree and isinstance(tree["state_dict"], dict):
        tree = tree["state_dict"]
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: holds a {type(tree).__name__}, not a state dict")
    return _resolve(tree, storages)
