"""The OpenVINO runner (osdface.runtime.openvino_runner) on the same ONNX export as ONNX Runtime, tiny model, CPU."""

from __future__ import annotations

import numpy as np
import openvino as ov  # the dev set-up installs the openvino extra: a missing package fails, never skips
import pytest
import torch

from osdface.cli import main
from osdface.errors import DeviceError
from osdface.export.onnx import GRAPH_FILES
from osdface.runtime.openvino_runner import OpenVinoPipeline, default_config


def _compiled(folder, name):
    core = ov.Core()
    return core.compile_model(core.read_model(str(folder / GRAPH_FILES[name])), "CPU", default_config("float32", "CPU"))


@pytest.mark.parametrize("name", list(GRAPH_FILES))
def test_each_graph_matches_its_torch_module(dynamic_dir, name, graph_case):
    feeds, expected = graph_case(name)
    got = _compiled(dynamic_dir, name)({k: v.numpy() for k, v in feeds.items()}).to_tuple()
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == tuple(e.shape)
        if e.dtype == torch.int64:  # prompt indices: identical, and still int64 at the graph boundary
            assert g.dtype == np.int64 and np.array_equal(g, e.numpy())
            assert (e >= 0).any()
        else:
            assert np.abs(g - e.numpy()).max() <= 1e-4


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_runner_matches_pipeline(pipe, static_dir, dynamic_dir, which, make_faces):
    runner = OpenVinoPipeline.from_folder(static_dir if which == "static" else dynamic_dir)
    assert runner.ov_device == "CPU"
    faces = make_faces(3)
    ref = pipe(faces, output_type="uint8")
    got = runner(faces, output_type="uint8")
    assert got.images.dtype == np.uint8 and got.images.shape == ref.images.shape
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert got.prompt_indices.dtype == torch.int64 and torch.equal(got.prompt_indices, ref.prompt_indices)
    pt = runner(faces).images
    assert pt.dtype == torch.float32 and (pt - pipe(faces).images).abs().max() <= 1e-4


def test_runner_resizes_like_the_pipeline(pipe, dynamic_dir, make_faces):
    faces = torch.nn.functional.interpolate(make_faces(1, seed=2), size=(48, 48), mode="bilinear", align_corners=False)
    runner = OpenVinoPipeline.from_folder(dynamic_dir)
    diff = runner(faces, output_type="uint8").images.astype(int) - pipe(faces, output_type="uint8").images.astype(int)
    assert np.abs(diff).max() <= 1


def test_default_config_keeps_float32():
    # OpenVINO's CPU default is bfloat16 where the CPU has it (several levels off on the tiny model)
    assert default_config("float32", "CPU") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert default_config("float32", "GPU.1") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert default_config("float16", "CPU") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert default_config("float16", "GPU") == {}


def test_fp16_export(pipe, model_dir, tmp_path, make_faces):
    assert main(["export-onnx", str(model_dir), "-o", str(tmp_path / "fp16"), "--fp16"]) == 0
    runner = OpenVinoPipeline.from_folder(tmp_path / "fp16")
    assert runner.dtype == torch.float16
    images = runner(make_faces(1), output_type="uint8").images
    ref = pipe(make_faces(1), output_type="uint8").images
    assert images.shape == ref.shape
    assert np.abs(images.astype(int) - ref.astype(int)).max() <= 8  # float16 graphs, float32 reference


def test_unknown_device_refused(static_dir):
    with pytest.raises(DeviceError, match="OpenVINO device 'NOSUCH' is not available here") as e:
        OpenVinoPipeline.from_folder(static_dir, device="nosuch")
    assert "\n" not in str(e.value)
