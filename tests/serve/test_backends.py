"""The service over an ONNX export (``--backend onnxruntime``), two replicas: the same answers as the torch model."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from _serve_helpers import SAMPLE, start_server
from PIL import Image

pytestmark = pytest.mark.slow


def test_onnxruntime_backend_serves_like_torch(tiny_model_dir, tmp_path):
    from osdface.cli import build_parser, main
    from osdface.cli.serve import load_engine
    from osdface.serve.config import ServeConfig

    onnx = tmp_path / "onnx"
    assert main(["export-onnx", str(tiny_model_dir), "-o", str(onnx), "--dynamic-batch"]) == 0
    outputs = {}
    for backend, model in (("onnxruntime", onnx), ("torch", tiny_model_dir)):
        args = build_parser().parse_args(["serve", "--model", str(model), "--backend", backend, "--device", "cpu",
                                          "--replicas", "2"])
        live = start_server(load_engine(args, ServeConfig(replicas=2, max_batch=4)))
        try:
            resp = httpx.post(f"{live.url}/v1/restore", content=SAMPLE.read_bytes(), timeout=120)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-faces"] == "1"
            outputs[backend] = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")).astype(int)
        finally:
            live.stop()
    diff = np.abs(outputs["onnxruntime"] - outputs["torch"])
    assert diff.max() <= 2 and diff.mean() < 0.01, (diff.max(), diff.mean())  # measured: 1 and 4e-5
