"""Issue 17 from the command line: familiar flags, fidelity, identity check, 1024 faces, first run, weights."""

import contextlib
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from osdface.cli import main
from osdface.constants import DEFAULT_BATCH_SIZE
from osdface.errors import WeightsNotFoundError
from osdface.face import FaceRestorer
from osdface.weights import BASE_MODEL_FILES


def _run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_missing_weights_error_comes_first_and_fast(tmp_path):
    """The first-run error lists every missing file, with no heavy import, in well under 2 s."""
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys, time
        t = time.perf_counter()
        from osdface.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["restore", "-i", {str(tmp_path / "in")!r}, "-o", {str(tmp_path / "out")!r}])
        print(json.dumps({{"rc": rc, "s": time.perf_counter() - t, "err": err.getvalue(),
                          "heavy": [m for m in ("torch", "diffusers", "cv2") if m in sys.modules]}}))
    """)
    env = {**os.environ, "OSDFACE_HOME": str(tmp_path / "home")}
    res = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True, timeout=120).stdout)
    assert res["rc"] == 2 and res["heavy"] == []
    assert res["s"] < 2.0, res["s"]  # the bound, generous: ~0.1 s without torch
    err = res["err"]
    for sub, name, size in BASE_MODEL_FILES:
        assert f"{sub}/{name} ({size})" in err
    for name in ("associate_2.ckpt", "embedding_change_weights.pth", "pytorch_lora_weights.safetensors"):
        assert name in err
    assert "huggingface-cli download" in err and "HF_ENDPOINT" in err and "osdface weights check" in err


def test_weights_check_accepts_a_good_release_and_names_a_bad_file(official_layout, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base, weights = official_layout
    rc, out, _ = _run(["weights", "check", str(base.parent)])
    assert rc == 0 and "6 of 6 files ok" in out and "keys and shapes match" in out
    home = tmp_path / "copy"
    shutil.copytree(base.parent, home)
    lora = home / "OSDFace" / "pytorch_lora_weights.safetensors"
    sd = load_file(str(lora))
    k = sorted(sd)[0]
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])  # one tensor of the wrong shape
    save_file(sd, str(lora))
    (home / "stable-diffusion-2-1-base" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    rc, out, _ = _run(["weights", "check", str(home)])
    assert rc == 1
    assert "MISSING" in out and "vae/diffusion_pytorch_model.safetensors" in out
    rc, out, _ = _run(["weights", "check", str(home / "OSDFace")])  # the release folder alone
    assert rc == 1 and "ERROR" in out and "pytorch_lora_weights.safetensors" in out


def test_weights_list_shows_model_files(official_layout, monkeypatch):
    monkeypatch.setenv("OSDFACE_HOME", str(official_layout[0].parent))
    rc, out, _ = _run(["weights", "list"])
    assert rc == 0
    assert "unet/diffusion_pytorch_model.safetensors" in out and "associate_2.ckpt" in out
    assert "keys and shapes match" in out and "metric weights folder" in out


def test_flags_fidelity_identity_and_face_size(tmp_path, tiny_model_dir, astronaut):
    Image.fromarray(astronaut).save(tmp_path / "astro.png")
    out = tmp_path / "out"
    rc, _, err = _run(["restore", "-i", str(tmp_path / "astro.png"), "-o", str(out), "--model", str(tiny_model_dir),
                       "-w", "0.5", "-s", "2", "--face-size", "128", "--min-identity", "1.0", "--keep-original",
                       "--report", str(tmp_path / "r.json")])
    assert rc == 0, err
    assert Image.open(out / "astro.png").size == (1024, 1024)  # -s 2
    face = json.loads((tmp_path / "r.json").read_text())["images"][0]["faces"][0]
    assert face["identity_flagged"] and face["kept_original"] and -1 <= face["identity"] < 1.0
    assert "identity (SFace, input vs restored face): mean" in err and "1 below --min-identity (1 kept original)" in err
    rc, _, err = _run(["restore", "-i", str(tmp_path / "astro.png"), "-o", str(tmp_path / "o2"),
                       "--model", str(tiny_model_dir), "--fidelity", "1.5"])
    assert rc == 2 and "fidelity" in err
    rc, _, err = _run(["restore", str(tmp_path / "astro.png"), "-o", str(tmp_path / "o3"),
                       "--model", str(tiny_model_dir), "--keep-original"])
    assert rc == 2 and "--keep-original needs --min-identity" in err


def test_same_default_batch_size_in_cli_and_api():
    from osdface.cli import build_parser

    args = build_parser().parse_args(["restore", "x", "-o", "y"])
    assert args.batch_size == DEFAULT_BATCH_SIZE == inspect.signature(FaceRestorer).parameters["batch_size"].default


def test_bg_upsampler_realesrgan_is_found_in_the_home(tmp_path, monkeypatch):
    from osdface.face.background import ModelUpsampler, RRDBNet, create_bg_upsampler

    monkeypatch.setenv("OSDFACE_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="RealESRGAN_x2plus.pth"):
        create_bg_upsampler("realesrgan")
    (tmp_path / "face").mkdir()
    net = RRDBNet(scale=2, num_feat=4, num_block=1, num_grow_ch=4)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "face" / "RealESRGAN_x2plus.pth")
    up = create_bg_upsampler("realesrgan", device="cpu")
    assert isinstance(up, ModelUpsampler)
    assert up(np.zeros((8, 8, 3), np.uint8), 2).shape == (16, 16, 3)
