"""ONNX export (osdface.export.onnx) and the ONNX Runtime runner (osdface.runtime.onnx_runner), tiny model, CPU.

What both engines share (folder refusals, external data, restore --backend) is in test_exported_runners.py."""

from __future__ import annotations

import json

import numpy as np
import onnx  # noqa: F401 - the dev set-up installs the onnx extra: a missing package fails, never skips
import onnxruntime as ort
import pytest
import torch

from osdface.cli import main  # noqa: E402
from osdface.export.onnx import (  # noqa: E402
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    MANIFEST_NAME,
    sha256_file,
)
from osdface.runtime.onnx_runner import OnnxRuntimePipeline  # noqa: E402
from osdface.testing import TINY_RESOLUTION  # noqa: E402


def _session(folder, name):
    return ort.InferenceSession(str(folder / GRAPH_FILES[name]), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("name", list(GRAPH_FILES))
def test_each_graph_matches_its_torch_module(dynamic_dir, name, graph_case):
    feeds, expected = graph_case(name)
    got = _session(dynamic_dir, name).run(None, {k: v.numpy() for k, v in feeds.items()})
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == tuple(e.shape)
        if e.dtype == torch.int64:  # prompt indices: identical
            assert np.array_equal(g, e.numpy())
            assert (e >= 0).any()
        else:
            assert np.abs(g - e.numpy()).max() <= 1e-4


def test_static_graphs_take_one_image(static_dir):
    s = _session(static_dir, "vae_encoder")
    assert s.get_inputs()[0].shape == [1, 3, TINY_RESOLUTION, TINY_RESOLUTION]


def test_manifest(pipe, dynamic_dir, static_dir):
    m = json.loads((dynamic_dir / MANIFEST_NAME).read_text())
    assert (m["format"], m["format_version"], m["opset"]) == (FORMAT, FORMAT_VERSION, 17)
    assert {"osdface_version", "torch_version", "onnx_version"} <= set(m)
    assert m["alpha_cumprod"] == pipe.alpha_cumprod.item()  # the float64 value the pipeline uses
    assert (m["timestep"], m["resolution"], m["dtype"]) == (399, TINY_RESOLUTION, "float32")
    assert m["scaling_factor"] == pipe.vae.config.scaling_factor
    assert sorted(m["graphs"]) == sorted(GRAPH_FILES)
    for name, g in m["graphs"].items():
        assert g["file"] == GRAPH_FILES[name]
        assert g["sha256"] == sha256_file(dynamic_dir / g["file"])
        assert g["bytes"] == (dynamic_dir / g["file"]).stat().st_size
        assert g["external_data"] is None
    pe = m["graphs"]["prompt_encoder"]
    assert pe["outputs"] == [{"name": "prompt", "shape": ["batch", 77, 32], "dtype": "float32"},
                             {"name": "prompt_indices", "shape": ["batch", 77], "dtype": "int64"}]
    assert m["graphs"]["unet"]["inputs"][0] == {"name": "latent", "shape": ["batch", 4, 8, 8], "dtype": "float32"}
    static = json.loads((static_dir / MANIFEST_NAME).read_text())
    assert static["graphs"]["vae_decoder"]["outputs"][0]["shape"] == [1, 3, TINY_RESOLUTION, TINY_RESOLUTION]
    assert sorted(p.name for p in dynamic_dir.iterdir()) == sorted([*GRAPH_FILES.values(), MANIFEST_NAME])


# --------------------------------------------------------------------------------- runner
@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_runner_matches_pipeline(pipe, static_dir, dynamic_dir, which, make_faces):
    runner = OnnxRuntimePipeline.from_folder(static_dir if which == "static" else dynamic_dir)
    assert runner.providers[-1] == "CPUExecutionProvider"
    faces = make_faces(3)
    ref = pipe(faces, output_type="uint8")
    got = runner(faces, output_type="uint8")
    assert got.images.dtype == np.uint8 and got.images.shape == ref.images.shape
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert torch.equal(got.prompt_indices, ref.prompt_indices)
    pt = runner(faces).images
    assert pt.dtype == torch.float32 and (pt - pipe(faces).images).abs().max() <= 1e-4
    pil = runner(faces[:1], output_type="pil").images
    assert pil[0].size == (TINY_RESOLUTION, TINY_RESOLUTION)


def test_runner_resizes_like_the_pipeline(pipe, dynamic_dir, make_faces):
    faces = make_faces(1, seed=2)
    faces = torch.nn.functional.interpolate(faces, size=(48, 48), mode="bilinear", align_corners=False)
    runner = OnnxRuntimePipeline.from_folder(dynamic_dir)
    diff = runner(faces, output_type="uint8").images.astype(int) - pipe(faces, output_type="uint8").images.astype(int)
    assert np.abs(diff).max() <= 1


# ------------------------------------------------------------------------------------ CLI
def test_cli_round_trip(pipe, model_dir, tmp_path, capsys, make_faces):
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(model_dir), "-o", str(out), "--dynamic-batch", "--opset", "17"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*GRAPH_FILES.values(), MANIFEST_NAME])
    assert "wrote" in capsys.readouterr().out
    faces = make_faces(2)
    diff = OnnxRuntimePipeline.from_folder(out)(faces, output_type="uint8").images.astype(int) \
        - pipe(faces, output_type="uint8").images.astype(int)
    assert np.abs(diff).max() <= 1


def test_cli_fp16(model_dir, tmp_path, make_faces):
    out = tmp_path / "fp16"
    assert main(["export-onnx", str(model_dir), "-o", str(out), "--fp16"]) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["dtype"] == "float16"
    assert m["graphs"]["unet"]["inputs"][1]["dtype"] == "float16"
    assert m["graphs"]["prompt_encoder"]["outputs"][1]["dtype"] == "int64"
    runner = OnnxRuntimePipeline.from_folder(out)
    assert runner.dtype == torch.float16
    images = runner(make_faces(1), output_type="uint8").images
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)


def test_cli_bad_model_dir(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("osdface: error:") and "nowhere" in err and "\n" not in err
    assert not out.exists()
