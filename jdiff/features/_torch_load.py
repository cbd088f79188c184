"""Read PyTorch ``state_dict`` files into NumPy arrays without torch and without running
pickled code; read and write the same state dicts as ``.npz``.

A ``torch.save`` file is a pickle plus raw storage bytes. Unpickling an untrusted pickle
can run arbitrary code: any ``GLOBAL`` opcode names an importable callable and ``REDUCE``
calls it. :class:`_TensorUnpickler` resolves globals through an allow-list that holds only
what a plain state dict needs (``collections.OrderedDict``, the tensor-rebuild functions
of ``torch._utils``, replaced by NumPy versions written here, and the ``torch.*Storage``
names, replaced by inert dtype markers); any other global raises :class:`UnsafePickleError`
before it is imported, so nothing named in the file is ever executed. Storages are read
as bytes from the file and viewed with NumPy.

Two container layouts are supported (both written by ``torch.save``):

- zip (torch >= 1.6, the default): ``<prefix>/data.pkl`` holds the object, whose
  persistent ids ``("storage", type, key, location, numel)`` point at raw little- or
  big-endian storages ``<prefix>/data/<key>`` (``<prefix>/byteorder`` says which);
- legacy (``_use_new_zipfile_serialization=False``, and every file written before 1.6,
  such as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` of 2019): a magic-number
  pickle, a protocol-version pickle, a system-info pickle, the object pickle (persistent
  ids ``("storage", type, key, location, numel, view)``), a pickled list of storage keys,
  then for each key an int64 element count and the raw bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

__all__ = ["UnsafePickleError", "load_torch_state_dict", "load_npz_state_dict", "save_npz", "load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names something other than what a tensor state dict needs (a
    ``ValueError`` too: a refused file is bad input, reported in one line naming it)."""


class _Storage:
    """Marker for ``torch.<Type>Storage`` in a pickle: carries the element dtype only."""

    __slots__ = ("name", "dtype")  # no __dict__: a BUILD opcode cannot set attributes

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


def _bfloat16():
    import ml_dtypes  # installed with jax

    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _storage_marker(name: str) -> _Storage:
    if name == "BFloat16Storage":
        return _Storage(name, _bfloat16())
    return _Storage(name, _STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named by a persistent id; its bytes are attached once read (after the
    pickle in the legacy format). A legacy view is a slice of its root storage."""

    __slots__ = ("key", "marker", "numel", "root", "offset", "_array")

    def __init__(self, key: str, marker: _Storage, numel: int, root=None, offset: int = 0):
        self.key = key
        self.marker = marker
        self.numel = numel
        self.root = root
        self.offset = offset
        self._array = None

    def attach(self, data: bytes, byteorder: str) -> None:
        dtype = self.marker.dtype.newbyteorder("<" if byteorder == "little" else ">")
        if len(data) != self.numel * dtype.itemsize:
            raise ValueError(
                f"storage {self.key!r} ({self.marker}) should hold {self.numel} elements = "
                f"{self.numel * dtype.itemsize} bytes, the file has {len(data)}"
            )
        self._array = np.frombuffer(data, dtype=dtype)

    @property
    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array[self.offset : self.offset + self.numel]
        if self._array is None:
            raise ValueError(f"storage {self.key!r} has no data in the file")
        return self._array


class _Tensor:
    """A tensor recorded while unpickling, built once every storage's bytes are known."""

    __slots__ = ("storage", "storage_offset", "size", "stride")

    def __init__(self, storage, storage_offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, expected a storage")
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = size
        self.stride = stride

    def build(self) -> np.ndarray:
        """The strided view ``size``/``stride`` (in elements) of the storage from
        ``storage_offset``, copied into a native-endian contiguous array."""
        try:
            size = tuple(int(s) for s in self.size)
            stride = tuple(int(s) for s in self.stride)
            offset = int(self.storage_offset)
        except (TypeError, ValueError):
            raise ValueError(f"tensor with size {self.size!r}, stride {self.stride!r} is malformed") from None
        if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
            raise ValueError(f"tensor with size {size}, stride {stride}, offset {offset} is malformed")
        flat = self.storage.array
        native = flat.dtype.newbyteorder("=")
        if any(s == 0 for s in size):
            return np.zeros(size, native)
        if int(np.prod(size)) > flat.size:
            # Only overlapping (expanded) views hold more elements than their storage; a
            # weights file has none, and a hostile one could ask for terabytes this way.
            raise ValueError(
                f"tensor of size {size} holds more elements than its storage {self.storage.key!r} ({flat.size})"
            )
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise ValueError(
                f"tensor with size {size}, stride {stride}, offset {offset} reads element {last} of storage "
                f"{self.storage.key!r}, which holds {flat.size}"
            )
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
        )
        return np.array(view, dtype=native, order="C")  # a copy; keeps 0-d tensors 0-d


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` and ``_rebuild_tensor`` (the extra
    arguments, ``requires_grad``, hooks and metadata, do not matter for values)."""
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    """Stand-in for ``torch._utils._rebuild_parameter``: the parameter's tensor."""
    if not isinstance(data, _Tensor):
        raise UnsafePickleError(f"parameter rebuilt from a {type(data).__name__}, expected a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _TensorUnpickler(pickle.Unpickler):
    """An unpickler that can build only dicts, lists, tuples, scalars, strings and tensors.

    ``find_class`` (called for ``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ`` and ``EXT*``)
    returns objects from an allow-list and raises :class:`UnsafePickleError` for anything
    else, so no module named by the file is imported and no callable of its choosing runs.
    ``persistent_load`` resolves ``("storage", ...)`` ids through ``storage``.
    """

    def __init__(self, file, *, storage=None, path="<pickle>"):
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
            return _storage_marker(name)
        raise UnsafePickleError(
            f"{self._path}: refusing to load global {module}.{name}: a weights file may only hold tensors "
            "(OrderedDict, torch._utils._rebuild_tensor_v2, torch.*Storage); this one asks for more, "
            "and torch.load would run it"
        )

    def persistent_load(self, pid):
        if self._storage is None:
            raise UnsafePickleError(f"{self._path}: unexpected persistent id {pid!r} in a header pickle")
        if not isinstance(pid, tuple) or len(pid) < 5:
            raise UnsafePickleError(f"{self._path}: malformed persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise UnsafePickleError(f"{self._path}: persistent id of kind {kind!r}; only storages are allowed")
        marker = pid[1]
        if not isinstance(marker, _Storage):
            raise UnsafePickleError(f"{self._path}: storage type {marker!r} in {pid!r} is not a torch.*Storage")
        try:
            key, numel = str(pid[2]), int(pid[4])
        except (TypeError, ValueError):
            raise UnsafePickleError(f"{self._path}: malformed persistent id {pid!r}") from None
        return self._storage(key, marker, numel, pid[5] if len(pid) > 5 else None)


def _resolve(obj):
    """Build every recorded tensor in a nested container of dicts/lists/tuples."""
    if isinstance(obj, _Tensor):
        return obj.build()
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _load_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: a zip file without exactly one '<prefix>/data.pkl' is not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byte order {byteorder!r}")
        storages: dict[str, _StorageRef] = {}

        def storage(key, marker, numel, _view):
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise ValueError(f"{path}: storage {name!r} is missing from the archive")
                ref = _StorageRef(key, marker, numel)
                ref.attach(zf.read(name), byteorder)
                storages[key] = ref
            return storages[key]

        obj = _TensorUnpickler(io.BytesIO(zf.read(pkl[0])), storage=storage, path=path).load()
    return _resolve(obj)


def _load_legacy(path: str):
    with open(path, "rb") as f:
        try:
            magic = _TensorUnpickler(f, path=path).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a torch.save file (neither the zip nor the legacy format): {e}") from None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch.save file (neither the zip nor the legacy format)")
        protocol = _TensorUnpickler(f, path=path).load()
        if protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: legacy torch protocol {protocol!r}, expected {_LEGACY_PROTOCOL}")
        sys_info = _TensorUnpickler(f, path=path).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

        roots: dict[str, _StorageRef] = {}
        views: dict[str, _StorageRef] = {}

        def storage(key, marker, numel, view):
            if key not in roots:
                roots[key] = _StorageRef(key, marker, numel)
            if view is None:
                return roots[key]
            try:
                view_key, offset, view_size = str(view[0]), int(view[1]), int(view[2])
            except (TypeError, ValueError, IndexError):
                raise UnsafePickleError(f"{path}: malformed storage view {view!r}") from None
            if view_key not in views:
                views[view_key] = _StorageRef(view_key, marker, view_size, root=roots[key], offset=offset)
            return views[view_key]

        obj = _TensorUnpickler(f, storage=storage, path=path).load()
        keys = _TensorUnpickler(f, path=path).load()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
            raise ValueError(f"{path}: storage key list {keys!r} does not match the pickle's storages")
        for key in map(str, keys):
            ref = roots[key]
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: file truncated before storage {key!r}")
            (count,) = struct.unpack("<q" if little else ">q", head)
            if count != ref.numel:
                raise ValueError(f"{path}: storage {key!r} has {count} elements, the pickle says {ref.numel}")
            ref.attach(f.read(ref.numel * ref.marker.dtype.itemsize), "little" if little else "big")
    return _resolve(obj)


def _flatten(obj, prefix=""):
    """A nested dict of arrays -> flat ``{"a.b.c": array}``; other leaves are errors."""
    out = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, np.ndarray):
        return {prefix[:-1]: obj}
    raise ValueError(f"entry {prefix[:-1]!r} is a {type(obj).__name__}, not a tensor")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``'d state dict as NumPy arrays, without torch and without
    executing any pickled code.

    Args:
      path: a file written by ``torch.save`` in the zip format (the default since torch
        1.6) or the legacy format (``_use_new_zipfile_serialization=False``, and files from
        before 1.6). The object must be a (possibly nested) dict of tensors; a checkpoint
        dict ``{"state_dict": {...}}`` works too, with the keys flattened with ``.``.

    Returns:
      ``{name: array}`` in the file's order, each a native-endian contiguous array of the
      tensor's dtype (bfloat16 via ``ml_dtypes``).

    Raises:
      UnsafePickleError: the pickle references anything other than ``OrderedDict``,
        ``torch._utils._rebuild_tensor_v2``/``_rebuild_tensor``/``_rebuild_parameter`` and
        ``torch.*Storage`` (raised before anything named is imported or called).
      ValueError: the file is not a ``torch.save`` file, is truncated, or holds something
        other than tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
        if not isinstance(obj, Mapping):
            raise ValueError(f"holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")
        return _flatten(obj)
    except ValueError as e:  # UnsafePickleError included: every message names the file
        raise _naming(e, path) from e
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable torch.save file: {e}") from e


def _naming(e: ValueError, path: str) -> ValueError:
    """``e`` with ``path`` at the start of its message (itself when it is there)."""
    if str(e).startswith(path):
        return e
    return (UnsafePickleError if isinstance(e, UnsafePickleError) else ValueError)(f"{path}: {e}")


def save_npz(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write a state dict (``{name: array}``, e.g. from :func:`load_torch_state_dict`) as an
    uncompressed ``.npz`` with the names as keys, loadable with ``allow_pickle=False``
    (bfloat16 arrays are widened to float32, exactly: ``.npz`` has no bfloat16).

    Raises:
      ValueError: a value is not a numeric array (object arrays cannot be stored safely).
    """
    arrays = {}
    for k, v in state_dict.items():
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":
            if a.dtype == _bfloat16():
                a = a.astype(np.float32)  # exact; .npz has no bfloat16
            else:
                raise ValueError(f"state dict entry {k!r} has dtype {a.dtype}, not a numeric array")
        arrays[k] = a
    with open(os.fspath(path), "wb") as f:
        np.savez(f, **arrays)


def load_npz_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict written by :func:`save_npz` (never unpickles: ``allow_pickle=False``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file, when it is not an ``.npz`` archive of numeric arrays
        (an object array would need pickle, refused).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz archive of named arrays")
    out = {}
    with z:
        for k in z.files:
            try:
                out[k] = z[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # an object array: pickle refused
                raise ValueError(f"{path}: array {k!r} cannot be read as a numeric array: {e}") from e
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """:func:`load_npz_state_dict` for ``.npz`` files, :func:`load_torch_state_dict` otherwise."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        return load_npz_state_dict(path)
    return load_torch_state_dict(path)
