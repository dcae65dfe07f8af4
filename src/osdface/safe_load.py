"""Read tensors from foreign PyTorch checkpoints without executing code from the file.

Plain state dicts go through ``torch.load(weights_only=True)``. Lightning checkpoints such as
the official ``associate_2.ckpt`` also pickle objects like hyper-parameter namespaces, which
``weights_only`` refuses; for those we read the zip archive with our own restricted unpickler:

* tensor-rebuild functions, storages, builtin containers and a few numpy reconstructors are
  resolved to the real (data-only) objects;
* classes from known *configuration* libraries (Lightning, OmegaConf, argparse, pathlib, ...)
  are replaced by :class:`InertObject` stand-ins that only store the data they are given; the
  real classes are never imported or called;
* every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any user code) is
  refused with :class:`UnsafeCheckpointError`, naming it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError, OSDFaceError, WeightsNotFoundError

#: Top-level modules whose classes are replaced by inert stand-ins (configuration containers).
INERT_MODULE_ROOTS = frozenset(
    {"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse", "pathlib", "datetime", "typing"}
)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: not a valid safetensors file ({reason})") from None


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


def _allowed_globals() -> dict[str, Any]:
    import torch._utils as tu

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
        "builtins.bytes": bytes,
        "builtins.bytearray": bytearray,
        "builtins.object": object,
        "builtins.slice": slice,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(tu, name):
            allowed[f"torch._utils.{name}"] = getattr(tu, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
        allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, record_prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = record_prefix
        self._source = source
        self._allowed = _allowed_globals()
        self._storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.split(".")[0] in INERT_MODULE_ROOTS:
            return _inert_class(full)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load: the checkpoint references '{full}', which would be imported "
            "and could run code while unpickling. Only tensors and plain configuration objects are accepted."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=self._storages[key], dtype=dtype, _internal=True)


def _restricted_zip_load(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise UnsafeCheckpointError(f"{path}: not a PyTorch zip checkpoint (no single data.pkl inside)")
        prefix = pkl[0][: -len("data.pkl")]
        return _RestrictedUnpickler(zf.read(pkl[0]), zf, prefix, str(path)).load()


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Load a foreign ``.pth`` / ``.ckpt`` on the CPU without executing code from it.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file references code (functions, non-configuration classes).
        ValueError: the file is not a readable PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first_error:
        if not zipfile.is_zipfile(path):
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: {first_error}".split("\n")[0]
            ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    return _restricted_zip_load(path)
