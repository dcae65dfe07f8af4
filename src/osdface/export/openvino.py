"""Convert an ONNX export (:mod:`osdface.export.onnx`) to OpenVINO IR, optionally with int8 weights.

The output folder has the same ``manifest.json`` contract as the ONNX folder (graph names, input/output
names and shapes, the host constants), with ``graph_format: "openvino-ir"``: each graph is
``<name>.xml`` (the network) with its weights in ``<name>.bin`` (listed as its external data). Only
:class:`~osdface.runtime.openvino_runner.OpenVinoPipeline` runs it; OpenVINO memory-maps the ``.bin``
files instead of parsing protobuf, so it also loads faster than the ONNX folder.

``int8_weights=True`` compresses the weights of :data:`INT8_GRAPHS` with NNCF's data-free weight
compression (``nncf.compress_weights``, INT8 asymmetric, one scale and zero point per output channel;
activations stay float and the matrix products run in float after decompression). It is a size/speed
option with an accuracy cost, measured in docs/performance.md ("int8 weights"), never a default. The
prompt encoder is kept float: its output is a nearest-codebook choice (the 77 token indices), which int8
weights flipped for 0.4 % of the tokens on the tiny test model.

NNCF runs in a child Python process (``python -c``, so a caller's script is never re-imported): in our
test suite, a process that had run ``compress_weights`` crashed later (SIGSEGV) in unrelated video
restoration, so NNCF's global state is kept out of the caller's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ModelFileError
from ..io.onnx_format import GRAPH_FORMATS, GRAPH_IO, MANIFEST_NAME, WEIGHT_COMPRESSIONS, read_manifest
from ..utils.io import atomic_dir, sha256_file
from ..utils.logging import get_logger
from ..utils.optional import require_package

__all__ = ["INT8_GRAPHS", "export_openvino"]

logger = get_logger(__name__)

#: the graphs whose weights ``int8_weights=True`` compresses (see the module docstring for the prompt encoder)
INT8_GRAPHS = ("vae_encoder", "unet", "vae_decoder")


def _compress_int8(src_xml: str, dst_xml: str) -> None:
    """(child process) ``src_xml`` → int8-weight IR at ``dst_xml`` (float constants not touched stay float32)."""
    import logging

    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.WARNING)  # not its per-layer statistics table
    model = ov.Core().read_model(src_xml)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(compressed, dst_xml, compress_to_fp16=False)


def _compress_in_child(src_xml: Path, dst_xml: Path) -> None:
    code = "import sys; from osdface.export.openvino import _compress_int8; _compress_int8(sys.argv[1], sys.argv[2])"
    done = subprocess.run([sys.executable, "-c", code, str(src_xml), str(dst_xml)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise ModelFileError(f"{dst_xml.name}: int8 weight compression (nncf) failed: {reason}")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def export_openvino(onnx_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    int8_weights: bool = False) -> dict[str, Any]:
    """Write the OpenVINO IR of the ONNX export ``onnx_dir`` to ``output_dir``; returns its manifest.

    ``onnx_dir`` is checked in full first (every file's SHA-256: it is about to be copied into a new
    self-describing folder). ``output_dir`` is written atomically (nothing is left on failure).

    Raises:
        ModelFileError: ``onnx_dir`` is not a valid ONNX export, or is already an IR folder.
        InvalidSettingError: ``openvino`` (or, with ``int8_weights``, ``nncf``) is not installed.
    """
    ov = require_package("openvino", "openvino", "an OpenVINO IR export")
    if int8_weights:
        require_package("nncf", "openvino", "int8 weight compression")
    src_dir = Path(onnx_dir).expanduser()
    src = read_manifest(src_dir, verify="sha256")
    if src["graph_format"] != "onnx":
        raise ModelFileError(f"{src_dir}: already an OpenVINO IR folder (convert the ONNX export it came from)")
    manifest = {**src, "graph_format": GRAPH_FORMATS[1], "weight_compression": WEIGHT_COMPRESSIONS[1] if int8_weights
                else None, "openvino_version": ov.__version__, "converted_by": __version__, "graphs": {}}
    core = ov.Core()
    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        for name in GRAPH_IO:
            g = src["graphs"][name]
            xml = tmp / (Path(g["file"]).stem + ".xml")
            logger.info("converting %s → %s%s", g["file"], xml.name,
                        " (int8 weights)" if int8_weights and name in INT8_GRAPHS else "")
            model = core.read_model(str(src_dir / g["file"]))
            if int8_weights and name in INT8_GRAPHS:
                float_xml = tmp / f".float-{xml.name}"
                ov.save_model(model, str(float_xml), compress_to_fp16=False)
                del model
                _compress_in_child(float_xml, xml)
                float_xml.unlink()
                float_xml.with_suffix(".bin").unlink()
            else:
                ov.save_model(model, str(xml), compress_to_fp16=False)
                del model
            manifest["graphs"][name] = {**g, **_file_entry(xml), "external_data": _file_entry(xml.with_suffix(".bin"))}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", out)
    return manifest
