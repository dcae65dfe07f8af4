"""Run an exported ONNX folder (:mod:`osdface.export.onnx`) with OpenVINO.

OpenVINO reads the ONNX files themselves (``Core.read_model``): the folder is the one ONNX Runtime runs,
checked by the same manifest validation, and :class:`OpenVinoPipeline` shares the host code and call
contract of :class:`~osdface.runtime.exported.ExportedPipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError, InvalidSettingError
from ..utils.logging import get_logger
from .exported import ExportedPipeline, read_manifest

__all__ = ["INT8_GRAPHS", "OpenVinoPipeline", "default_config"]

logger = get_logger(__name__)

#: the graphs whose weights ``int8_weights=True`` compresses. The prompt encoder stays in float32: its
#: output is a nearest-code choice (token indices), which int8 weights change on the tiny test model
INT8_GRAPHS = ("vae_encoder", "unet", "vae_decoder")

#: virtual devices OpenVINO accepts besides the physical ones it lists
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def _require_ov():
    try:
        import openvino
    except ImportError:
        raise InvalidSettingError(
            "running ONNX graphs with OpenVINO needs the 'openvino' package: pip install 'osdface[openvino]'") from None
    return openvino


def _require_nncf():
    try:
        import nncf
    except ImportError:
        raise InvalidSettingError(
            "int8 weights need the 'nncf' package: pip install 'osdface[openvino]'") from None
    return nncf


def _compress_int8(nncf, model):
    """``nncf.compress_weights`` (INT8_ASYM, data-free) without its statistics table and progress bar on stdout."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the progress bar (rich) prints to sys.stdout
            return nncf.compress_weights(model)
    finally:
        nncf_logger.setLevel(level)


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

    def __init__(self, folder: Path, manifest: dict[str, Any], graphs: dict[str, Any], ov_device: str,
                 int8_weights: bool = False):
        super().__init__(folder, manifest, graphs)
        self.ov_device = ov_device
        self.int8_weights = int8_weights

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str = "CPU",
                    config: dict[str, Any] | None = None, int8_weights: bool = False) -> OpenVinoPipeline:
        """Check ``folder`` (:func:`~osdface.runtime.exported.read_manifest`), compile its four graphs.

        Args:
            device: an OpenVINO device (``CPU``, ``GPU``, ``GPU.1``, ``NPU``, ``AUTO``...).
            config: compile properties for every graph (default :func:`default_config`).
            int8_weights: compress the weights of the graphs in :data:`INT8_GRAPHS` to int8 at load
                (``nncf.compress_weights``: INT8 asymmetric, per output channel, data-free; activations
                stay float) between reading and compiling them. Nothing is written to the folder. Off by
                default: smaller and faster on the CPU at a cost in accuracy (docs/performance.md).

        Raises:
            ModelFileError: see :func:`~osdface.runtime.exported.read_manifest`; or OpenVINO cannot read
                or compile a graph, or its inputs/outputs differ from the manifest (naming the file).
            DeviceError: OpenVINO does not have ``device`` here.
            InvalidSettingError: ``openvino`` (or, with ``int8_weights``, ``nncf``) is not installed.
        """
        ov = _require_ov()
        nncf = _require_nncf() if int8_weights else None
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder)
        core = ov.Core()
        device = str(device).upper()
        available = list(core.available_devices)
        if device not in available and device.split(":")[0] not in _VIRTUAL_DEVICES:
            raise DeviceError(f"OpenVINO device {device!r} is not available here (available: {', '.join(available)})")
        config = dict(config) if config is not None else default_config(manifest["dtype"], device)

        compress = {manifest["graphs"][name]["file"] for name in INT8_GRAPHS} if int8_weights else set()

        def open_graph(path: Path):
            model = core.read_model(str(path))
            if path.name in compress:
                model = _compress_int8(nncf, model)
            compiled = core.compile_model(model, device, config)
            return (compiled.create_infer_request(), [set(p.get_names()) for p in compiled.inputs],
                    [set(p.get_names()) for p in compiled.outputs])

        runner = cls(folder, manifest, cls._open_graphs(folder, manifest, open_graph), device, int8_weights)
        logger.info("OpenVINO device: %s", device)
        if int8_weights:
            logger.info("OpenVINO: int8 weights (nncf INT8_ASYM, data-free) in %s; prompt encoder in float32",
                        ", ".join(INT8_GRAPHS))
        return runner

    def _run_graph(self, handle, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # share_outputs=False (the default): the results are copies, not the request's reused buffers
        return list(handle.infer(feed).to_tuple())

    def __repr__(self) -> str:
        int8 = ", int8_weights=True" if self.int8_weights else ""
        return f"{type(self).__name__}({self.source!r}, dtype={self.manifest['dtype']}, device={self.ov_device!r}{int8})"
