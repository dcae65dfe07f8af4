"""What every runner of an exported folder (:mod:`osdface.export.onnx`) shares, whatever engine runs the graphs.

* :func:`read_manifest`: the folder check (format, version, fields, every listed file and its SHA-256,
  no unlisted ``.onnx``/``.xml``/``.bin``), before any graph is loaded;
* :class:`ExportedPipeline`: the call contract of :class:`~osdface.pipelines.OSDFacePipeline` and its host
  code (preprocessing, the float64 x0 step, the NaN/Inf checks, the output conversion). A subclass only
  opens the four graphs (:meth:`ExportedPipeline._open_graphs`) and runs one (:meth:`ExportedPipeline._run_graph`).

The engines: :mod:`osdface.runtime.onnx_runner` (ONNX Runtime), :mod:`osdface.runtime.openvino_runner`
(OpenVINO, reading the same ONNX files).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import InvalidSettingError, ModelFileError
from ..image import from_model_range
from ..io.onnx_format import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FORMATS,
    GRAPH_IO,
    GRAPH_SUFFIXES,
    MANIFEST_NAME,
    WEIGHT_COMPRESSIONS,
)
from ..pipelines.output import OSDFacePipelineOutput
from ..pipelines.pipeline_osdface import OSDFacePipeline, OutputType, _convert_output
from ..utils.io import read_json, sha256_file

DTYPES = {"float32": torch.float32, "float16": torch.float16}
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
    if m["dtype"] not in DTYPES:
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


def first_line(e: BaseException) -> str:
    """An engine's exception as one line (engines raise multi-line messages of their own types)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


#: opens one graph file → (engine handle, the names of each input, the names of each output); may raise
#: anything. A port may carry several names (OpenVINO keeps a tensor's aliases): one of them must match.
GraphOpener = Callable[[Path], tuple[Any, list[set[str]], list[set[str]]]]


def _names_match(ports: list[set[str]], expected: tuple[str, ...]) -> bool:
    return len(ports) == len(expected) and all(e in names for names, e in zip(ports, expected))


class ExportedPipeline(ABC):
    """OSDFace restoration with the four graphs of an ONNX export, on any engine.

    Same call contract as :class:`~osdface.pipelines.OSDFacePipeline` — for aligned crops directly and,
    through :class:`~osdface.face.FaceRestorer`, for whole photos and videos — with ``latent="mode"``
    only (the exported encoder returns the posterior mode). Host code runs on the CPU in torch, with
    the pipeline's own functions: :meth:`preprocess`, :meth:`predict_x0` (float64),
    :meth:`check_finite`, and its output conversion. :attr:`device` is therefore always the CPU
    (where inputs go and where a detector or parser beside it runs), whatever runs the graphs.

    Subclasses set :attr:`engine` and implement :meth:`_run_graph`; their ``from_folder`` checks the
    folder and opens the graphs with :meth:`_open_graphs`.
    """

    #: the engine's name, as messages show it
    engine = "?"

    # the pipeline's host code, reused as is: it reads device, dtype, resolution, alpha_cumprod, source
    preprocess = OSDFacePipeline.preprocess
    predict_x0 = OSDFacePipeline.predict_x0
    check_finite = OSDFacePipeline.check_finite

    def __init__(self, folder: Path, manifest: dict[str, Any], graphs: dict[str, Any]):
        self.manifest, self.graphs = manifest, graphs
        self.source = str(folder)
        self.device = torch.device("cpu")
        self.dtype = DTYPES[manifest["dtype"]]
        self.resolution = int(manifest["resolution"])
        self.timestep = int(manifest["timestep"])
        self.scaling_factor = float(manifest["scaling_factor"])
        self.batch_size = None if manifest["dynamic_batch"] else 1

    @property
    def alpha_cumprod(self) -> torch.Tensor:
        """ᾱ_t as recorded by the exporter (float64, the value the torch pipeline uses)."""
        return torch.tensor(self.manifest["alpha_cumprod"], dtype=torch.float64)

    @classmethod
    def _open_graphs(cls, folder: Path, manifest: dict[str, Any], open_graph: GraphOpener) -> dict[str, Any]:
        """Open the four graphs of a checked folder with ``open_graph``; check their input/output names.

        Raises:
            ModelFileError: the engine cannot load a graph, or its inputs/outputs differ from the
                manifest (one line naming the file).
        """
        graphs = {}
        for name in GRAPH_IO:
            path = folder / manifest["graphs"][name]["file"]
            try:
                handle, inputs, outputs = open_graph(path)
            except Exception as e:  # noqa: BLE001 - engines raise their own exception types
                raise ModelFileError(f"{path}: {cls.engine} cannot load the graph ({first_line(e)})") from None
            expected_in, expected_out = GRAPH_IO[name]
            if not (_names_match(inputs, expected_in) and _names_match(outputs, expected_out)):
                raise ModelFileError(f"{path}: graph inputs/outputs differ from {MANIFEST_NAME}")
            graphs[name] = handle
        return graphs

    @abstractmethod
    def _run_graph(self, handle: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one opened graph on ``feed`` (input name → contiguous array); its outputs in manifest order."""

    def _run(self, name: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        return [torch.from_numpy(np.asarray(a)) for a in self._run_graph(self.graphs[name], feed)]

    def restore_tensor(self, lq: torch.Tensor, return_indices: bool = False, check_finite: bool = True):
        """Steps 3–7 (docs/method.md §2) on a model-space batch ``(B, 3, R, R)`` in [-1, 1]: the graphs,
        the float64 x0 step between them; returns ``(B, 3, R, R)`` float in [0, 1] (and the indices)."""
        step = self.batch_size or lq.shape[0]
        outs, idxs = [], []
        for chunk in lq.split(step):
            (z,) = self._run("vae_encoder", image=chunk)
            prompt, idx = self._run("prompt_encoder", image=chunk)
            (eps,) = self._run("unet", latent=z, prompt=prompt.to(z.dtype))
            x0 = self.predict_x0(z, eps)
            if check_finite:
                self.check_finite(x0, "predicted latent (VAE encoder, prompt or UNet)")
            (img,) = self._run("vae_decoder", latent=x0.to(self.dtype))
            if check_finite:
                self.check_finite(img, "VAE decoder output")
            outs.append(from_model_range(img.clamp(-1, 1)).clamp(0.0, 1.0))
            idxs.append(idx.long())
        out, idx = torch.cat(outs), torch.cat(idxs)
        return (out, idx) if return_indices else out

    @torch.inference_mode()
    def __call__(self, images, output_type: OutputType = "pt", latent: Literal["mode"] = "mode",
                 generator: torch.Generator | None = None, rounding: Literal["round", "truncate"] = "round",
                 return_dict: bool = True):
        """Restore aligned RGB face crops (see :meth:`OSDFacePipeline.__call__`). ``generator`` is accepted
        for the same signature and ignored: the posterior mode involves no randomness.

        Raises:
            ImageError: inputs that are not RGB images in [0, 1] or not square.
            InvalidSettingError: ``latent`` other than ``"mode"``.
            NonFiniteOutputError: the graphs produced NaN/Inf; names the folder.
        """
        if latent != "mode":
            raise InvalidSettingError(f"latent={latent!r}: an ONNX export encodes the posterior mode only "
                                      "(use latent='mode', or the torch pipeline for 'sample')")
        lq = self.preprocess(images)
        out, idx = self.restore_tensor(lq, return_indices=True)
        result = _convert_output(out.float(), output_type, rounding)
        if not return_dict:
            return result
        return OSDFacePipelineOutput(images=result, prompt_indices=idx)
