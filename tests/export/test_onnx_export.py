"""ONNX export (osdface.export.onnx) and the ONNX Runtime runner (osdface.runtime.onnx_runner), tiny model, CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx  # noqa: F401 - the dev set-up installs the onnx extra: a missing package fails, never skips
import onnxruntime as ort
import pytest
import torch

from osdface.cli import main  # noqa: E402
from osdface.errors import InvalidSettingError, ModelFileError  # noqa: E402
from osdface.export.onnx import (  # noqa: E402
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    MANIFEST_NAME,
    export_onnx,
    graph_modules,
    sha256_file,
)
from osdface.runtime.onnx_runner import OnnxRuntimePipeline  # noqa: E402
from osdface.testing import TINY_RESOLUTION, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def static_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "static"
    export_onnx(pipe, out)
    return out


@pytest.fixture(scope="module")
def dynamic_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "dynamic"
    export_onnx(pipe, out, dynamic_batch=True)
    return out


def _faces(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=g)


def _session(folder, name):
    return ort.InferenceSession(str(folder / GRAPH_FILES[name]), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("name", list(GRAPH_FILES))
def test_each_graph_matches_its_torch_module(pipe, dynamic_dir, name):
    modules = graph_modules(pipe)
    image = _faces(2) * 2 - 1  # a batch of 2 other than the tracing input, through the dynamic axis
    with torch.no_grad():
        latent = modules["vae_encoder"](image)
        prompt, _ = modules["prompt_encoder"](image)
        feeds = {"vae_encoder": {"image": image}, "prompt_encoder": {"image": image},
                 "unet": {"latent": latent, "prompt": prompt}, "vae_decoder": {"latent": latent * 1.3}}[name]
        expected = modules[name](*feeds.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
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
def test_runner_matches_pipeline(pipe, static_dir, dynamic_dir, which):
    runner = OnnxRuntimePipeline.from_folder(static_dir if which == "static" else dynamic_dir)
    assert runner.providers[-1] == "CPUExecutionProvider"
    faces = _faces(3)
    ref = pipe(faces, output_type="np")
    got = runner(faces, output_type="np")
    assert got.images.dtype == np.uint8 and got.images.shape == ref.images.shape
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert torch.equal(got.prompt_indices, ref.prompt_indices)
    pt = runner(faces).images
    assert pt.dtype == torch.float32 and (pt - pipe(faces).images).abs().max() <= 1e-4
    pil = runner(faces[:1], output_type="pil").images
    assert pil[0].size == (TINY_RESOLUTION, TINY_RESOLUTION)


def test_runner_resizes_like_the_pipeline(pipe, dynamic_dir):
    faces = _faces(1, seed=2)
    faces = torch.nn.functional.interpolate(faces, size=(48, 48), mode="bilinear", align_corners=False)
    runner = OnnxRuntimePipeline.from_folder(dynamic_dir)
    diff = runner(faces, output_type="np").images.astype(int) - pipe(faces, output_type="np").images.astype(int)
    assert np.abs(diff).max() <= 1


def test_runner_refuses_latent_sample(dynamic_dir):
    with pytest.raises(InvalidSettingError, match="mode"):
        OnnxRuntimePipeline.from_folder(dynamic_dir)(_faces(1), latent="sample")


def test_external_data(pipe, tmp_path):
    out = tmp_path / "ext"
    m = export_onnx(pipe, out, external_data_threshold=0)  # every graph's weights in <file>.data
    for g in m["graphs"].values():
        assert g["external_data"]["file"] == g["file"] + ".data"
        assert g["external_data"]["sha256"] == sha256_file(out / g["external_data"]["file"])
        assert (out / g["file"]).stat().st_size < (out / g["external_data"]["file"]).stat().st_size
    faces = _faces(1)
    diff = OnnxRuntimePipeline.from_folder(out)(faces, output_type="np").images.astype(int) \
        - pipe(faces, output_type="np").images.astype(int)
    assert np.abs(diff).max() <= 1
    (out / "unet.onnx.data").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unet.onnx.data: sha256"):
        OnnxRuntimePipeline.from_folder(out)


def _edit_manifest(folder, edit):
    path = folder / MANIFEST_NAME
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _bump_version(m):
    m["format_version"] = FORMAT_VERSION + 1


def _tamper(folder):
    p = folder / "vae_decoder.onnx"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))


REFUSALS = {
    "no manifest": (lambda d: (d / MANIFEST_NAME).unlink(), MANIFEST_NAME + ": ONNX manifest not found"),
    "other version": (lambda d: _edit_manifest(d, _bump_version), MANIFEST_NAME + ": format version 2"),
    "other format": (lambda d: _edit_manifest(d, lambda m: m.update(format="x")), "not an osdface ONNX manifest"),
    "missing file": (lambda d: (d / "unet.onnx").unlink(), "unet.onnx: listed in manifest.json but missing"),
    "extra onnx": (lambda d: shutil.copy(d / "unet.onnx", d / "other.onnx"), "other.onnx: unknown .onnx file"),
    "sha256": (_tamper, "vae_decoder.onnx: sha256 does not match"),
    "escaping name": (lambda d: _edit_manifest(d, lambda m: m["graphs"]["unet"].update(file="../unet.onnx")),
                      "graphs.unet.file must be a plain file name"),
    "malformed": (lambda d: (d / MANIFEST_NAME).write_text("{"), "malformed ONNX manifest"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_runner_refuses_bad_folders(static_dir, tmp_path, case):
    folder = tmp_path / "copy"
    shutil.copytree(static_dir, folder)
    damage, message = REFUSALS[case]
    damage(folder)
    with pytest.raises(ModelFileError) as e:
        OnnxRuntimePipeline.from_folder(folder)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("model") / "model")


def test_cli_round_trip(pipe, model_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(model_dir), "-o", str(out), "--dynamic-batch", "--opset", "17"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*GRAPH_FILES.values(), MANIFEST_NAME])
    assert "wrote" in capsys.readouterr().out
    faces = _faces(2)
    diff = OnnxRuntimePipeline.from_folder(out)(faces, output_type="np").images.astype(int) \
        - pipe(faces, output_type="np").images.astype(int)
    assert np.abs(diff).max() <= 1


def test_cli_fp16(model_dir, tmp_path):
    out = tmp_path / "fp16"
    assert main(["export-onnx", str(model_dir), "-o", str(out), "--fp16"]) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["dtype"] == "float16"
    assert m["graphs"]["unet"]["inputs"][1]["dtype"] == "float16"
    assert m["graphs"]["prompt_encoder"]["outputs"][1]["dtype"] == "int64"
    runner = OnnxRuntimePipeline.from_folder(out)
    assert runner.dtype == torch.float16
    images = runner(_faces(1), output_type="np").images
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)


def test_cli_bad_model_dir(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("osdface: error:") and "nowhere" in err and "\n" not in err
    assert not out.exists()


# ------------------------------------------------------------------ osdface restore --backend onnxruntime
def test_restore_backend_onnxruntime(model_dir, static_dir, tmp_path, capsys):
    from PIL import Image

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, face in enumerate((_faces(2) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(face).save(crops / f"face{i}.png")
    common = [str(crops), "--aligned", "--device", "cpu", "--batch-size", "2"]
    assert main(["restore", *common, "-o", str(tmp_path / "onnx"), "--model", str(static_dir),
                 "--backend", "onnxruntime"]) == 0
    assert main(["restore", *common, "-o", str(tmp_path / "torch"), "--model", str(model_dir), "--dtype", "fp32"]) == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "onnx" / f"face{i}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "torch" / f"face{i}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1
    capsys.readouterr()
    for extra, message in ((["--aligned"], "--backend onnxruntime"), ([], "aligned crops only"),
                           (["--aligned", "--dtype", "fp16"], "exported in float32"),
                           (["--aligned", "--latent", "sample"], "posterior mode only")):
        args = [str(crops), "-o", str(tmp_path / "bad"), "--backend", "onnxruntime", *extra]
        if message != "--backend onnxruntime":
            args += ["--model", str(static_dir)]
        assert main(["restore", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
