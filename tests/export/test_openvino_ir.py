"""``osdface export-openvino``: the ONNX export as OpenVINO IR, float and int8 weights (tiny model, CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from osdface.cli import main
from osdface.errors import ModelFileError
from osdface.export.openvino import INT8_GRAPHS
from osdface.io.onnx_format import MANIFEST_NAME
from osdface.runtime.exported import read_manifest
from osdface.runtime.onnx_runner import OnnxRuntimePipeline
from osdface.runtime.openvino_runner import OpenVinoPipeline

#: int8 weights on the tiny model (seed 0, 4 random faces), measured 2026-11-30: max 35, mean 2.05 levels
INT8_MAX_LEVELS, INT8_MEAN_LEVELS = 48, 3.0


@pytest.fixture(scope="module")
def ir_dirs(dynamic_dir, tmp_path_factory):
    """The float and the int8-weight IR of the tiny dynamic-batch ONNX export, written by the CLI."""
    root = tmp_path_factory.mktemp("ir")
    assert main(["export-openvino", str(dynamic_dir), "-o", str(root / "float")]) == 0
    assert main(["export-openvino", str(dynamic_dir), "-o", str(root / "int8"), "--int8-weights"]) == 0
    return root / "float", root / "int8"


def test_ir_manifest(dynamic_dir, ir_dirs):
    src = read_manifest(dynamic_dir)
    for folder, compression in zip(ir_dirs, (None, "int8_asym"), strict=True):
        m = read_manifest(folder, verify="sha256")
        assert (m["graph_format"], m["weight_compression"]) == ("openvino-ir", compression)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [MANIFEST_NAME] + [f for g in m["graphs"].values() for f in (g["file"], g["external_data"]["file"])])
        for name, g in m["graphs"].items():  # the graph contract is the ONNX export's
            assert g["file"] == name + ".xml" and g["external_data"]["file"] == name + ".bin"
            assert (g["inputs"], g["outputs"]) == (src["graphs"][name]["inputs"], src["graphs"][name]["outputs"])
        for key in ("dtype", "dynamic_batch", "resolution", "timestep", "scaling_factor", "alpha_cumprod"):
            assert m[key] == src[key]
    float_m, int8_m = (read_manifest(f) for f in ir_dirs)
    for name in INT8_GRAPHS:  # int8 weights: the weight files shrink (conv/matmul weights 4 bytes → 1)
        assert int8_m["graphs"][name]["external_data"]["bytes"] < 0.5 * float_m["graphs"][name]["external_data"]["bytes"]
    assert int8_m["graphs"]["prompt_encoder"]["external_data"]["bytes"] == \
        float_m["graphs"]["prompt_encoder"]["external_data"]["bytes"]  # kept float: it picks the tokens


def test_float_ir_equals_the_onnx_folder(dynamic_dir, ir_dirs, make_faces):
    faces = make_faces(3)
    a = OpenVinoPipeline.from_folder(dynamic_dir)(faces, output_type="uint8").images
    b = OpenVinoPipeline.from_folder(ir_dirs[0])(faces, output_type="uint8").images
    assert np.array_equal(a, b)


def test_int8_weights_cost_and_tokens(pipe, ir_dirs, make_faces):
    faces = make_faces(4)
    runner = OpenVinoPipeline.from_folder(ir_dirs[1])
    assert "weights=int8_asym" in repr(runner)
    lq = pipe.preprocess(faces)
    out, idx = runner.restore_tensor(lq, return_indices=True)
    ref, ref_idx = pipe.restore_tensor(lq, return_indices=True)
    assert torch.equal(idx, ref_idx)  # the prompt encoder is not compressed: the same 77 tokens
    levels = (out * 255).round().sub((ref * 255).round()).abs()
    assert 0 < levels.max() <= INT8_MAX_LEVELS and levels.mean() <= INT8_MEAN_LEVELS


def test_restore_runs_ir_with_openvino(ir_dirs, tmp_path, make_faces, capsys):
    Image.fromarray((make_faces(1)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(
        tmp_path / "face.png")
    common = [str(tmp_path / "face.png"), "--aligned", "--model", str(ir_dirs[0])]
    assert main(["restore", *common, "-o", str(tmp_path / "auto")]) == 0  # auto → openvino on the CPU
    assert (tmp_path / "auto" / "face.png").is_file()
    capsys.readouterr()
    assert main(["restore", *common, "-o", str(tmp_path / "ort"), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert "an OpenVINO IR folder" in err and "--backend openvino" in err and "\n" not in err
    with pytest.raises(ModelFileError, match="an OpenVINO IR folder"):
        OnnxRuntimePipeline.from_folder(ir_dirs[0])


def test_ir_folder_refusals(ir_dirs, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(ir_dirs[0], folder)
    shutil.copy(folder / "unet.xml", folder / "other.xml")
    with pytest.raises(ModelFileError, match="other.xml: unknown .xml file"):
        OpenVinoPipeline.from_folder(folder)
    (folder / "other.xml").unlink()
    m = json.loads((folder / MANIFEST_NAME).read_text())
    m["graph_format"] = "tflite"
    (folder / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ModelFileError, match="graph_format 'tflite' not supported"):
        OpenVinoPipeline.from_folder(folder)


@pytest.mark.parametrize("case", ["not an export", "already IR", "output not empty"])
def test_export_openvino_refusals(ir_dirs, dynamic_dir, tmp_path, capsys, case):
    (tmp_path / "plain").mkdir()
    src = {"not an export": tmp_path / "plain", "already IR": ir_dirs[0], "output not empty": dynamic_dir}[case]
    out = tmp_path / "out"
    if case == "output not empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    capsys.readouterr()
    assert main(["export-openvino", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("osdface: error: ") and "\n" not in err
    expected = {"not an export": "ONNX manifest not found", "already IR": "already an OpenVINO IR folder",
                "output not empty": str(out)}[case]
    assert expected in err
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == (["keep.txt"] if case == "output not empty" else [])  # nothing written
