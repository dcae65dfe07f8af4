"""Run an exported ONNX folder (:mod:`osdface.export.onnx`) with ONNX Runtime.

:class:`OnnxRuntimePipeline` has the call contract of :class:`~osdface.pipelines.OSDFacePipeline` and
shares its host code (:class:`~osdface.runtime.exported.ExportedPipeline`); only the four networks run
in ONNX Runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError
from ..io.onnx_format import read_manifest
from ..utils.io import sha256_file
from ..utils.logging import get_logger
from ..utils.optional import require_package
from .exported import ExportedPipeline

__all__ = ["OnnxRuntimePipeline", "default_providers", "read_manifest", "sha256_file"]

logger = get_logger(__name__)

#: preferred execution providers, best first; the CPU one is always available
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _require_ort():
    return require_package("onnxruntime", "onnx", "running ONNX graphs")


def default_providers() -> list[str]:
    """TensorRT and CUDA when this onnxruntime build has them, then the CPU."""
    available = set(_require_ort().get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available or p == "CPUExecutionProvider"]


class OnnxRuntimePipeline(ExportedPipeline):
    """OSDFace restoration with the four graphs of an ONNX export in ONNX Runtime sessions.

    See :class:`~osdface.runtime.exported.ExportedPipeline` for the call contract. Build with
    :meth:`from_folder`.
    """

    engine = "ONNX Runtime"

    @property
    def sessions(self) -> dict[str, Any]:
        """Graph name → its ``onnxruntime.InferenceSession``."""
        return self.graphs

    @property
    def providers(self) -> list[str]:
        """The execution providers the sessions actually use (of the first graph)."""
        return list(next(iter(self.graphs.values())).get_providers())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, providers: list | None = None,
                    session_options=None, verify: str = "size") -> OnnxRuntimePipeline:
        """Check ``folder`` (:func:`~osdface.runtime.exported.read_manifest`) and open its four graphs.

        Args:
            providers: ONNX Runtime execution providers (default :func:`default_providers`:
                TensorRT and CUDA when present, then the CPU).
            session_options: an ``onnxruntime.SessionOptions`` for every session (default: logging
                of errors only).

            verify: how the listed files are checked before loading: ``"size"`` or ``"sha256"``
                (:func:`~osdface.runtime.exported.read_manifest`).

        Raises:
            ModelFileError: see :func:`~osdface.runtime.exported.read_manifest`; or ONNX Runtime cannot
                load a graph, or its inputs/outputs differ from the manifest (naming the file).
            InvalidSettingError: ``onnxruntime`` is not installed.
        """
        ort = _require_ort()
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder, verify)
        if manifest["graph_format"] != "onnx":
            raise ModelFileError(f"{folder}: an OpenVINO IR folder ({manifest['graph_format']}, weights "
                                 f"{manifest['weight_compression'] or manifest['dtype']}): run it with OpenVINO "
                                 "(--backend openvino), or ONNX Runtime on the ONNX export it came from")
        providers = list(providers) if providers is not None else default_providers()
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # errors only (fp16 graphs log kernel-fallback warnings)

        def open_graph(path: Path):
            sess = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
            return sess, [{i.name} for i in sess.get_inputs()], [{o.name} for o in sess.get_outputs()]

        runner = cls(folder, manifest, cls._open_graphs(folder, manifest, open_graph))
        logger.info("ONNX Runtime providers: %s", ", ".join(runner.providers))
        return runner

    def _run_graph(self, handle, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return handle.run(None, feed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, dtype={self.manifest['dtype']}, providers={self.providers})"
