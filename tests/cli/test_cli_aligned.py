"""`osdface` CLI end to end on tiny weights in the official layout: convert, restore --aligned, errors."""

import hashlib
import sys

import numpy as np
import pytest
from PIL import Image

from osdface.cli import main


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(official_layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "model"
    base, weights = official_layout
    assert main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(out)]) == 0
    return out


@pytest.fixture()
def inputs(tmp_path, faces):
    d = tmp_path / "in"
    d.mkdir()
    for i, f in enumerate(faces[:3]):
        Image.fromarray(f).save(d / f"face{i}.png")
    Image.fromarray(faces[3]).resize((96, 96)).save(d / "big.jpg", quality=95)
    return d


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "osdface" in capsys.readouterr().out


def test_convert_writes_only_safe_files(model_dir):
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    assert (model_dir / "model_index.json").is_file()
    assert {p.suffix for p in files} <= {".json", ".safetensors"}


def test_restore_aligned_model_equals_official_files(model_dir, official_layout, inputs, tmp_path):
    base, weights = official_layout
    before = {p.name: _sha(p) for p in inputs.iterdir()}
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["restore", str(inputs), "-o", str(a), "--aligned", "--model", str(model_dir), "--batch-size", "2"]) == 0
    assert main(["restore", str(inputs / "*.png"), str(inputs / "big.jpg"), "-o", str(b), "--aligned",
                 "--base-model", str(base), "--weights", str(weights)]) == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == ["big.png", "face0.png", "face1.png", "face2.png"]
    for n in names:
        ia, ib = np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))
        assert ia.shape == (64, 64, 3)
        assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1  # batch 2 vs batch 1 rounding only
    assert {p.name: _sha(p) for p in inputs.iterdir()} == before  # inputs untouched
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temp files left


def test_restore_matches_python_api(model_dir, inputs, tmp_path):
    from osdface.pipelines import OSDFacePipeline

    out = tmp_path / "o"
    assert main(["restore", str(inputs / "face0.png"), "-o", str(out), "--aligned", "--model", str(model_dir)]) == 0
    pipe = OSDFacePipeline.from_pretrained(model_dir)
    expected = pipe(np.asarray(Image.open(inputs / "face0.png")), output_type="uint8").images[0]
    assert np.array_equal(np.asarray(Image.open(out / "face0.png")), expected)


def test_bad_files_reported_others_written(model_dir, inputs, tmp_path, capsys):
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.fromarray(np.zeros((64, 40, 3), np.uint8)).save(inputs / "wide.png")
    out = tmp_path / "o"
    code = main(["restore", str(inputs), str(tmp_path / "missing.png"), "-o", str(out), "--aligned",
                 "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png" in err and "wide.png" in err and "square" in err and "missing.png" in err
    assert sorted(p.name for p in out.iterdir()) == ["big.png", "face0.png", "face1.png", "face2.png"]


def test_skip_existing(model_dir, inputs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "face0.png").write_bytes(b"keep me")
    assert main(["restore", str(inputs), "-o", str(out), "--aligned", "--model", str(model_dir), "--skip-existing"]) == 0
    assert (out / "face0.png").read_bytes() == b"keep me"
    assert (out / "face1.png").is_file()


def test_missing_weights_say_what_and_where(tmp_path, inputs, monkeypatch, capsys):
    monkeypatch.setenv("OSDFACE_HOME", str(tmp_path / "home"))
    code = main(["restore", str(inputs / "face0.png"), "-o", str(tmp_path / "o"), "--aligned"])
    err = capsys.readouterr().err
    assert code == 2
    for needle in ("associate_2.ckpt", "embedding_change_weights.pth", "pytorch_lora_weights.safetensors",
                   str(tmp_path / "home" / "OSDFace"), str(tmp_path / "home" / "stable-diffusion-2-1-base")):
        assert needle in err
    assert not (tmp_path / "o").exists()


def test_console_script_entry_point():
    import subprocess
    from pathlib import Path

    exe = Path(sys.executable).parent / "osdface"
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("osdface ")


def test_plan_names_collisions_and_keeps_video_outputs(tmp_path):
    import argparse

    from osdface.cli.restore import _plan

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for p in (a / "x.png", b / "x.jpg", a / "clip.mp4"):
        p.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(suffix="", ext="png", aligned=False)
    plan = _plan([a / "x.png", b / "x.jpg", a / "clip.mp4"], out, args)
    assert plan[0] == (a / "x.png", out / "x.png", None)
    assert plan[1][:2] == (b / "x.jpg", None) and "x.jpg" in plan[1][2] and "already used" in plan[1][2]
    assert plan[2] == (a / "clip.mp4", out / "clip.mp4", None)  # a video's output is .mp4 (--skip-existing finds it)
    (f, dst, problem), = _plan([a / "x.png"], a, argparse.Namespace(suffix="", ext="png", aligned=True))
    assert dst is None and "overwrite the input" in problem
