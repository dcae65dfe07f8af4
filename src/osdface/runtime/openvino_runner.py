"""Run an exported folder with OpenVINO: the ONNX export (:mod:`osdface.export.onnx`) or its OpenVINO IR
(:mod:`osdface.export.openvino`, optionally with int8 weights).

OpenVINO reads either kind itself (``Core.read_model``); both are checked by the same manifest
validation, and :class:`OpenVinoPipeline` shares the host code and call contract of
:class:`~osdface.runtime.exported.ExportedPipeline`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError
from ..io.onnx_format import read_manifest
from ..utils.logging import get_logger
from ..utils.optional import require_package
from .exported import ExportedPipeline

__all__ = ["OpenVinoPipeline", "default_config"]

logger = get_logger(__name__)

#: virtual devices OpenVINO accepts besides the physical ones it lists
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def _require_ov():
    return require_package("openvino", "openvino", "running ONNX graphs with OpenVINO")


def default_config(dtype: str, device: str) -> dict[str, str]:
    """The compile configuration :meth:`OpenVinoPipeline.from_folder` uses unless given one.

    OpenVINO's CPU plugin computes in bfloat16 by default on CPUs that have it (AMX, AVX-512 BF16),
    which moves outputs by several 8-bit levels; float32 exports, and every export on the CPU, are
    run in float32 instead (``INFERENCE_PRECISION_HINT``). Float16 exports on other devices keep the
    device's default.
    """
    if dtype == "float32" or device.split(".")[0] == "CPU":
        return {"INFERENCE_PRECISION_HINT": "f32"}
    return {}


class OpenVinoPipeline(ExportedPipeline):
    """OSDFace restoration with the four graphs of an ONNX export compiled by OpenVINO.

    See :class:`~osdface.runtime.exported.ExportedPipeline` for the call contract. Build with
    :meth:`from_folder`.
    """

    engine = "OpenVINO"

    def __init__(self, folder: Path, manifest: dict[str, Any], graphs: dict[str, Any], ov_device: str):
        super().__init__(folder, manifest, graphs)
        self.ov_device = ov_device

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str = "CPU",
                    config: dict[str, Any] | None = None, verify: str = "size") -> OpenVinoPipeline:
        """Check ``folder`` (:func:`~osdface.runtime.exported.read_manifest`), compile its four graphs.

        Args:
            device: an OpenVINO device (``CPU``, ``GPU``, ``GPU.1``, ``NPU``, ``AUTO``...).
            config: compile properties for every graph (default :func:`default_config`).

            verify: how the listed files are checked before loading: ``"size"`` or ``"sha256"``
                (:func:`~osdface.runtime.exported.read_manifest`).

        Raises:
            ModelFileError: see :func:`~osdface.runtime.exported.read_manifest`; or OpenVINO cannot read
                or compile a graph, or its inputs/outputs differ from the manifest (naming the file).
            DeviceError: OpenVINO does not have ``device`` here.
            InvalidSettingError: ``openvino`` is not installed.
        """
        ov = _require_ov()
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder, verify)
        core = ov.Core()
        device = str(device).upper()
        available = list(core.available_devices)
        if device not in available and device.split(":")[0] not in _VIRTUAL_DEVICES:
            raise DeviceError(f"OpenVINO device {device!r} is not available here (available: {', '.join(available)})")
        config = dict(config) if config is not None else default_config(manifest["dtype"], device)

        def open_graph(path: Path):
            compiled = core.compile_model(core.read_model(str(path)), device, config)
            return (compiled.create_infer_request(), [set(p.get_names()) for p in compiled.inputs],
                    [set(p.get_names()) for p in compiled.outputs])

        runner = cls(folder, manifest, cls._open_graphs(folder, manifest, open_graph), device)
        logger.info("OpenVINO device: %s", device)
        return runner

    def _run_graph(self, handle, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # share_outputs=False (the default): the results are copies, not the request's reused buffers
        return list(handle.infer(feed).to_tuple())

    def __repr__(self) -> str:
        weights = self.manifest["weight_compression"] or self.manifest["dtype"]
        return f"{type(self).__name__}({self.source!r}, weights={weights}, device={self.ov_device!r})"
