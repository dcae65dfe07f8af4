"""The exported folder's contract, shared by the writers (:mod:`osdface.export.onnx`,
:mod:`osdface.export.openvino`) and the runners (:mod:`osdface.runtime`): format id and version,
manifest name, graph files and their input/output names (in the order a restoration runs them), and
:func:`read_manifest`, the check of a folder before any graph is loaded (format, version, fields,
every listed file's size — or SHA-256 —, no unlisted ``.onnx``/``.xml``/``.bin``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import InvalidSettingError, ModelFileError
from ..utils.io import read_json, sha256_file

FORMAT = "osdface-onnx"
FORMAT_VERSION = 2  # 2: every file's size ("bytes"), graph_format and weight_compression are recorded
MANIFEST_NAME = "manifest.json"

#: ``graph_format``: ONNX files (osdface export-onnx; every engine) or OpenVINO IR (.xml + .bin;
#: osdface export-openvino; OpenVINO only)
GRAPH_FORMATS = ("onnx", "openvino-ir")
#: graph file suffix per graph format
GRAPH_SUFFIXES = {"onnx": ".onnx", "openvino-ir": ".xml"}
#: ``weight_compression``: none (the exported precision) or NNCF int8 asymmetric weights (IR only)
WEIGHT_COMPRESSIONS = (None, "int8_asym")

#: graph name → file name
GRAPH_FILES = {
    "vae_encoder": "vae_encoder.onnx",
    "prompt_encoder": "prompt_encoder.onnx",
    "unet": "unet.onnx",
    "vae_decoder": "vae_decoder.onnx",
}
#: graph name → (input names, output names)
GRAPH_IO = {
    "vae_encoder": (("image",), ("latent",)),
    "prompt_encoder": (("image",), ("prompt", "prompt_indices")),
    "unet": (("latent", "prompt"), ("noise_pred",)),
    "vae_decoder": (("latent",), ("image",)),
}

def is_exported_folder(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` holds an exported folder's manifest (not checked: :func:`read_manifest` does that)."""
    return bool(folder) and (Path(folder).expanduser() / MANIFEST_NAME).is_file()


#: the ``dtype`` values an export may have
DTYPE_NAMES = ("float32", "float16")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _plain_name(manifest: Path, value: Any, what: str) -> str:
    """A file name from the manifest: a plain name inside the folder (no separators, no ``..``)."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise ModelFileError(f"{manifest}: {what} must be a plain file name inside the folder, got {value!r}")
    return value


#: how :func:`read_manifest` checks the listed files: ``"size"`` (existence and byte count: catches a
#: missing, truncated or partly copied file at no cost) or ``"sha256"`` (also reads every byte, ~1.5 s
#: per GB here: for a copy that may be corrupt in place)
VERIFY_MODES = ("size", "sha256")


def _check_file(folder: Path, manifest: Path, name: str, entry: dict[str, Any], verify: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ModelFileError(f"{path}: listed in {MANIFEST_NAME} but missing")
    size, digest = entry.get("bytes"), entry.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ModelFileError(f"{manifest}: malformed size (bytes) for {name}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ModelFileError(f"{manifest}: malformed sha256 for {name}")
    actual = path.stat().st_size
    if actual != size:
        raise ModelFileError(f"{path}: {actual} bytes, {MANIFEST_NAME} says {size} (truncated or changed file)")
    if verify == "sha256" and sha256_file(path) != digest:
        raise ModelFileError(f"{path}: sha256 does not match {MANIFEST_NAME} (the file was changed or is corrupt)")
    return path


def read_manifest(folder: str | os.PathLike, verify: str = "size") -> dict[str, Any]:
    """Read and check ``folder/manifest.json`` and every file it lists (without loading any graph).

    Args:
        verify: ``"size"`` (default) compares every listed file's size with the manifest;
            ``"sha256"`` also hashes every byte (:data:`VERIFY_MODES`). Hashing the real-size export
            (3.9 GB) takes ~6 s on the 2-core dev machine, more than loading it, so it is not the default.

    Raises:
        ModelFileError: (one line, naming the file) the manifest is missing or malformed, of another
            format or format version; a listed file is missing, of another size or (``verify="sha256"``)
            another sha256; the folder holds an ``.onnx``, ``.xml`` or ``.bin`` file the manifest does not list.
        InvalidSettingError: ``verify`` is not one of :data:`VERIFY_MODES`.
    """
    if verify not in VERIFY_MODES:
        raise InvalidSettingError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a folder (expected an ONNX export written by osdface export-onnx)")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX manifest not found (export the model with osdface export-onnx)")
    m = read_json(path, "ONNX manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ModelFileError(f"{path}: not an osdface ONNX manifest (format {got!r}, expected {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: format version {m.get('format_version')!r}; this osdface reads version "
                             f"{FORMAT_VERSION} (export again with this version)")
    for key, types in (("dtype", str), ("dynamic_batch", bool), ("resolution", int), ("timestep", int),
                       ("scaling_factor", (int, float)), ("alpha_cumprod", float), ("graphs", dict)):
        if not isinstance(m.get(key), types) or (types is int and isinstance(m.get(key), bool)):
            raise ModelFileError(f"{path}: field {key!r} is missing or has the wrong type")
    if m.get("graph_format") not in GRAPH_FORMATS:
        raise ModelFileError(f"{path}: graph_format {m.get('graph_format')!r} not supported "
                             f"({' or '.join(GRAPH_FORMATS)})")
    if m.get("weight_compression", "?") not in WEIGHT_COMPRESSIONS:
        raise ModelFileError(f"{path}: weight_compression {m.get('weight_compression', '(missing)')!r} not supported")
    suffix = GRAPH_SUFFIXES[m["graph_format"]]
    if m["dtype"] not in DTYPE_NAMES:
        raise ModelFileError(f"{path}: dtype {m['dtype']!r} not supported (float32 or float16)")
    if not (0.0 < m["alpha_cumprod"] < 1.0) or m["resolution"] < 8 or m["scaling_factor"] <= 0:
        raise ModelFileError(f"{path}: implausible alpha_cumprod, resolution or scaling_factor")
    graphs = m["graphs"]
    listed: set[str] = set()
    for name in GRAPH_IO:
        g = graphs.get(name)
        if not isinstance(g, dict):
            raise ModelFileError(f"{path}: graph {name!r} is not listed")
        file = _plain_name(path, g.get("file"), f"graphs.{name}.file")
        if not file.endswith(suffix):
            raise ModelFileError(f"{path}: graphs.{name}.file must be a {suffix} file ({m['graph_format']} folder)")
        if file in listed:
            raise ModelFileError(f"{path}: {file} is listed twice")
        _check_file(folder, path, file, g, verify)
        listed.add(file)
        ext = g.get("external_data")
        if ext is not None:
            if not isinstance(ext, dict):
                raise ModelFileError(f"{path}: graphs.{name}.external_data is malformed")
            data = _plain_name(path, ext.get("file"), f"graphs.{name}.external_data.file")
            _check_file(folder, path, data, ext, verify)
            listed.add(data)
        inputs, outputs = GRAPH_IO[name]
        for key, expected in (("inputs", inputs), ("outputs", outputs)):
            got = g.get(key)
            if not isinstance(got, list) or [v.get("name") if isinstance(v, dict) else None for v in got] != \
                    list(expected):
                raise ModelFileError(f"{path}: graphs.{name}.{key} must be {list(expected)}")
    unknown = sorted(set(graphs) - set(GRAPH_IO))
    if unknown:
        raise ModelFileError(f"{path}: unknown graph(s) {unknown}")
    for f in sorted(folder.iterdir()):
        if f.suffix in (".onnx", ".xml", ".bin") and f.name not in listed:
            raise ModelFileError(f"{f}: unknown {f.suffix} file, not listed in {MANIFEST_NAME}")
    return m


