"""The exported ONNX folder's contract, shared by the writer (:mod:`osdface.export.onnx`) and the
reader (:mod:`osdface.runtime.onnx_runner`): format id and version, manifest name, graph files and
their input/output names (in the order a restoration runs them)."""

from __future__ import annotations

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
