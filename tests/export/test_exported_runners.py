"""What the two runners of an ONNX export share, checked on both engines (ONNX Runtime and OpenVINO):
folder refusals, external data, latent/generator handling and ``osdface restore --aligned --backend``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime  # noqa: F401 - the dev set-up installs the onnx extra: a missing package fails, never skips
import openvino  # noqa: F401 - likewise the openvino extra
import pytest
import torch
from PIL import Image

from osdface.cli import main
from osdface.errors import InvalidSettingError, ModelFileError
from osdface.export.onnx import FORMAT_VERSION, MANIFEST_NAME, export_onnx, sha256_file
from osdface.runtime.exported import read_manifest
from osdface.runtime.onnx_runner import OnnxRuntimePipeline
from osdface.runtime.openvino_runner import OpenVinoPipeline

ENGINES = {"onnxruntime": OnnxRuntimePipeline, "openvino": OpenVinoPipeline}


@pytest.fixture(params=list(ENGINES))
def backend(request) -> str:
    return request.param


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


def _truncate(folder):
    p = folder / "vae_decoder.onnx"
    p.write_bytes(p.read_bytes()[:-1])


def _unloadable(folder):
    """A graph file that is not ONNX, with a matching sha256: the engine itself must refuse it."""
    (folder / "unet.onnx").write_bytes(b"not an onnx graph")
    _edit_manifest(folder, lambda m: m["graphs"]["unet"].update(sha256=sha256_file(folder / "unet.onnx"),
                                                                 bytes=(folder / "unet.onnx").stat().st_size))


REFUSALS = {
    "no manifest": (lambda d: (d / MANIFEST_NAME).unlink(), MANIFEST_NAME + ": ONNX manifest not found"),
    "other version": (lambda d: _edit_manifest(d, _bump_version), f"{MANIFEST_NAME}: format version {FORMAT_VERSION + 1}"),
    "other format": (lambda d: _edit_manifest(d, lambda m: m.update(format="x")), "not an osdface ONNX manifest"),
    "missing file": (lambda d: (d / "unet.onnx").unlink(), "unet.onnx: listed in manifest.json but missing"),
    "extra onnx": (lambda d: shutil.copy(d / "unet.onnx", d / "other.onnx"), "other.onnx: unknown .onnx file"),
    "truncated": (_truncate, "vae_decoder.onnx: "),  # "<n> bytes, manifest.json says <n + 1>"
    "no size": (lambda d: _edit_manifest(d, lambda m: m["graphs"]["unet"].pop("bytes")),
                "malformed size (bytes) for unet.onnx"),
    "escaping name": (lambda d: _edit_manifest(d, lambda m: m["graphs"]["unet"].update(file="../unet.onnx")),
                      "graphs.unet.file must be a plain file name"),
    "malformed": (lambda d: (d / MANIFEST_NAME).write_text("{"), "malformed ONNX manifest"),
    "unloadable graph": (_unloadable, "unet.onnx: {engine} cannot load the graph ("),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_runners_refuse_bad_folders(backend, static_dir, tmp_path, case):
    folder = tmp_path / "copy"
    shutil.copytree(static_dir, folder)
    damage, message = REFUSALS[case]
    damage(folder)
    with pytest.raises(ModelFileError) as e:
        ENGINES[backend].from_folder(folder)
    assert message.format(engine=ENGINES[backend].engine) in str(e.value)
    assert "\n" not in str(e.value)


def test_sha256_verification_is_opt_in(backend, static_dir, tmp_path, make_faces):
    """A same-size change passes the default size check; ``verify="sha256"`` finds it before loading."""
    folder = tmp_path / "copy"
    shutil.copytree(static_dir, folder)
    assert read_manifest(folder, "sha256")["graphs"]["vae_decoder"]["bytes"] > 0
    _tamper(folder)  # flips the last byte of a graph file: its size is unchanged
    read_manifest(folder)
    with pytest.raises(ModelFileError, match="vae_decoder.onnx: sha256 does not match") as e:
        ENGINES[backend].from_folder(folder, verify="sha256")
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidSettingError, match="verify must be one of size, sha256"):
        ENGINES[backend].from_folder(folder, verify="md5")


def test_latent_sample_refused_generator_ignored(backend, dynamic_dir, make_faces):
    runner = ENGINES[backend].from_folder(dynamic_dir)
    assert str(runner.device) == "cpu"  # host code (and the detectors beside it) on the CPU
    faces = make_faces(2)
    with pytest.raises(InvalidSettingError, match="posterior mode only") as e:
        runner(faces, latent="sample", generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(e.value)
    plain = runner(faces, output_type="uint8").images
    seeded = runner(faces, output_type="uint8", latent="mode", generator=torch.Generator().manual_seed(7)).images
    assert np.array_equal(plain, seeded)


@pytest.fixture(scope="module")
def external_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ext") / "ext"
    export_onnx(pipe, out, external_data_threshold=0)  # every graph's weights in <file>.data
    return out


def test_external_data(backend, pipe, external_dir, tmp_path, make_faces):
    m = json.loads((external_dir / MANIFEST_NAME).read_text())
    for g in m["graphs"].values():
        assert g["external_data"]["file"] == g["file"] + ".data"
        assert g["external_data"]["sha256"] == sha256_file(external_dir / g["external_data"]["file"])
        assert (external_dir / g["file"]).stat().st_size < (external_dir / g["external_data"]["file"]).stat().st_size
    faces = make_faces(1)
    diff = ENGINES[backend].from_folder(external_dir)(faces, output_type="uint8").images.astype(int) \
        - pipe(faces, output_type="uint8").images.astype(int)
    assert np.abs(diff).max() <= 1
    folder = tmp_path / "copy"
    shutil.copytree(external_dir, folder)
    (folder / "unet.onnx.data").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unet.onnx.data: 1 bytes, manifest.json says"):
        ENGINES[backend].from_folder(folder)


# ------------------------------------------------------------------ osdface restore --aligned --backend
def test_restore_aligned_backend(backend, model_dir, static_dir, tmp_path, make_faces):
    crops = tmp_path / "crops"
    crops.mkdir()
    for i, face in enumerate((make_faces(2) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(face).save(crops / f"face{i}.png")
    common = [str(crops), "--aligned", "--device", "cpu", "--batch-size", "2"]
    assert main(["restore", *common, "-o", str(tmp_path / "exported"), "--model", str(static_dir),
                 "--backend", backend]) == 0
    assert main(["restore", *common, "-o", str(tmp_path / "torch"), "--model", str(model_dir), "--dtype", "fp32"]) == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "exported" / f"face{i}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "torch" / f"face{i}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1


CLI_REFUSALS = {  # extra arguments (with --model ONNX_DIR unless marked) → the one-line message
    "no model": (["--aligned"], "--backend {b} needs --model ONNX_DIR"),
    "base model": (["--base-model", "x", "--weights", "y"], "--backend {b} needs --model ONNX_DIR"),
    "dtype": (["--aligned", "--dtype", "fp16"], "exported in float32"),
    "latent sample": (["--latent", "sample"], "--backend {b} encodes the posterior mode only"),
    "unfused lora": (["--no-fuse-lora"], "--backend {b}: the export has the LoRA merged"),
    "device": (["--device", "mps"], "--device mps: --backend {b} runs on"),
}


@pytest.mark.parametrize("case", list(CLI_REFUSALS))
def test_restore_backend_refusals(backend, static_dir, tmp_path, capsys, case):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "face.png")
    extra, message = CLI_REFUSALS[case]
    args = ["restore", str(tmp_path / "face.png"), "-o", str(tmp_path / "out"), "--backend", backend, *extra]
    if case != "no model":
        args += ["--model", str(static_dir)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(b=backend) in err and "\n" not in err
    assert not (tmp_path / "out" / "face.png").exists()


# ------------------------------------------------------------------ --backend auto (the default)
def _resolve(model, device="auto"):
    from argparse import Namespace

    from osdface.cli.common import resolve_backend

    return resolve_backend(Namespace(backend="auto", model=model and str(model), device=device))


def test_backend_auto_follows_folder_and_device(model_dir, static_dir):
    assert _resolve(model_dir) == _resolve(None) == _resolve(model_dir, "cuda") == "torch"
    assert _resolve(static_dir) == _resolve(static_dir, "cpu") == "openvino"  # fastest on the CPU (performance.md)
    assert _resolve(static_dir, "cuda") == _resolve(static_dir, "cuda:1") == "onnxruntime"
    assert _resolve(static_dir, "npu") == "openvino"


def test_restore_backend_auto_runs_openvino(static_dir, model_dir, tmp_path, make_faces, capsys):
    Image.fromarray((make_faces(1)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(
        tmp_path / "face.png")
    common = [str(tmp_path / "face.png"), "--aligned", "--model", str(static_dir)]
    assert main(["restore", *common, "-o", str(tmp_path / "auto")]) == 0
    assert main(["restore", *common, "-o", str(tmp_path / "ov"), "--backend", "openvino"]) == 0
    assert (tmp_path / "auto" / "face.png").read_bytes() == (tmp_path / "ov" / "face.png").read_bytes()
    capsys.readouterr()
    # an ONNX folder is not a torch model folder: --backend torch says so in one line
    assert main(["restore", *common, "-o", str(tmp_path / "torch"), "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--model {static_dir}: an ONNX export" in err and "\n" not in err
    assert not (tmp_path / "torch").exists()


# ------------------------------------------------------------------ the pipeline's call, knobs included
def test_runner_call_matches_pipeline_knobs(backend, pipe, dynamic_dir, make_faces):
    """The runners share OSDFacePipeline.__call__: image=, return_dict=False, fidelity and latent_strength
    (host code) give the torch pipeline's result within a level; another timestep is refused."""
    runner = ENGINES[backend].from_folder(dynamic_dir)
    faces = make_faces(2)
    for kw in ({"fidelity": 0.5}, {"latent_strength": 0.6}):
        (got,) = runner(image=faces, output_type="uint8", return_dict=False, **kw)
        ref = pipe(image=faces, output_type="uint8", **kw).images
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    npf = runner(image=faces, output_type="np").images  # diffusers' float32 (B, H, W, 3) in [0, 1]
    assert npf.dtype == np.float32 and np.abs(npf - pipe(image=faces, output_type="np").images).max() <= 1e-4
    plain = runner(image=faces, output_type="uint8").images
    assert np.array_equal(runner(image=faces, output_type="uint8", fidelity=0.0, timestep=runner.timestep).images, plain)
    with pytest.raises(InvalidSettingError, match="this export runs t = 399 only") as e:
        runner(image=faces, timestep=200)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidSettingError, match="fidelity"):
        runner(image=faces, fidelity=1.5)
