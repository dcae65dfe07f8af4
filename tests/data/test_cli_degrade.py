"""``osdface degrade`` end to end on small real photos (scikit-image, bundled offline)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from osdface.cli import main
from osdface.data.datasets import DegradedFaceDataset
from osdface.data.degradation import PRESETS, Degrader, image_seed
from osdface.image import read_image, save_image


@pytest.fixture()
def hq_dir(tmp_path):
    """4 good images of assorted sizes/modes plus one corrupt file."""
    from PIL import Image
    from skimage import data

    root = tmp_path / "hq"
    root.mkdir()
    save_image(root / "astronaut.png", cv2.resize(data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA))
    save_image(root / "chelsea.jpg", cv2.resize(data.chelsea(), (90, 60), interpolation=cv2.INTER_AREA))
    Image.fromarray(cv2.resize(data.camera(), (64, 64)), "L").save(root / "camera.png")  # grayscale file
    rgba = np.dstack([cv2.resize(data.coffee(), (64, 64)), np.full((64, 64), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "coffee.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


GOOD = ["astronaut", "camera", "chelsea", "coffee"]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_degrade_folder_end_to_end(hq_dir, tmp_path, capsys):
    before = _snapshot(hq_dir)
    out = tmp_path / "lq"
    rc = main(["degrade", str(hq_dir), "-o", str(out), "--seed", "5"])
    err = capsys.readouterr().err
    assert rc == 1  # the corrupt file fails, the others are written
    assert "broken.png: cannot decode image" in err
    assert sorted(p.stem for p in out.glob("*.png")) == GOOD
    assert _snapshot(hq_dir) == before  # inputs untouched

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "osdface-degradation-manifest/1"
    assert manifest["preset"] == "daefr" and manifest["seed"] == 5
    assert manifest["config"] == PRESETS["daefr"].to_dict()
    records = {r["input"]: r for r in manifest["images"]}
    assert sorted(records) == ["astronaut.png", "camera.png", "chelsea.jpg", "coffee.png"]

    deg = Degrader("daefr")
    for name, rec in records.items():
        hq = read_image(hq_dir / name).rgb
        lq = read_image(out / rec["output"]).rgb
        assert lq.shape == hq.shape and [rec["height"], rec["width"]] == list(hq.shape[:2])
        assert rec["seed"] == image_seed(5, name)
        expected, params = deg(hq, rec["seed"])
        assert np.array_equal(lq, expected) and params == rec["params"]
        assert np.array_equal(deg.apply(hq, rec["params"]), lq)  # the manifest replays the image
        p = rec["params"]
        assert 0.1 <= p["blur"]["sigma_x"] <= 10 and 0.8 <= p["scale"] <= 8
        assert 0 <= p["noise"]["sigma"] <= 20 and 60 <= p["jpeg_quality"] <= 100
    # a grayscale input gives an (RGB-coded) image too
    assert read_image(out / "camera.png").rgb.shape == (64, 64, 3)


def test_worker_count_does_not_change_the_result(hq_dir, tmp_path):
    (hq_dir / "broken.png").unlink()
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"lq{workers}"
        assert main(["degrade", str(hq_dir), "-o", str(out), "--preset", "osediff-face", "--seed", "2",
                     "--workers", str(workers)]) == 0
        outs[workers] = out
    for name in GOOD:
        assert np.array_equal(read_image(outs[1] / f"{name}.png").rgb, read_image(outs[2] / f"{name}.png").rgb)
    m1, m2 = (json.loads((outs[w] / "manifest.json").read_text()) for w in (1, 2))
    assert m1 == m2 and m1["preset"] == "osediff-face"


def test_overrides_and_manifest_location(hq_dir, tmp_path):
    (hq_dir / "broken.png").unlink()
    out, manifest = tmp_path / "lq", tmp_path / "meta" / "params.json"
    rc = main(["degrade", str(hq_dir), "-o", str(out), "--scale", "4", "--jpeg", "30", "40",
               "--sigma", "2", "--noise", "5", "--manifest", str(manifest)])
    assert rc == 0 and not (out / "manifest.json").exists()
    m = json.loads(manifest.read_text())
    assert m["preset"] is None and m["config"]["downsample_range"] == [4.0, 4.0]
    for rec in m["images"]:
        p = rec["params"]
        assert p["scale"] == 4.0 and p["lq_size"] == [rec["height"] // 4, rec["width"] // 4]
        assert 30 <= p["jpeg_quality"] <= 40
        assert p["blur"]["sigma_x"] == 2.0 and p["noise"]["sigma"] == 5.0


def test_cli_output_equals_the_training_dataset_at_epoch_0(hq_dir, tmp_path):
    """Same identity (file name) and seed → the same LQ as DegradedFaceDataset without flips."""
    (hq_dir / "broken.png").unlink()
    (hq_dir / "chelsea.jpg").unlink()  # keep the 64×64 images
    out = tmp_path / "lq"
    assert main(["degrade", str(hq_dir), "-o", str(out), "--seed", "9"]) == 0
    ds = DegradedFaceDataset(hq_dir, size=64, hflip=False, seed=9)
    for i, key in enumerate(ds.keys):
        assert np.array_equal(ds.sample(i)["lq"], read_image(out / key).rgb)


def test_usage_errors_exit_2(hq_dir, tmp_path, capsys):
    out = str(tmp_path / "lq")
    assert main(["degrade", str(hq_dir), "-o", out, "--preset", "strong"]) == 2
    assert "unknown degradation preset 'strong'; choose from ['daefr', 'osediff-face']" in capsys.readouterr().err
    assert main(["degrade", str(hq_dir), "-o", out, "--scale", "1", "2", "3"]) == 2
    assert main(["degrade", str(hq_dir), "-o", out, "--sigma", "5", "1"]) == 2
    assert "blur_sigma: low 5.0 is above high 1.0" in capsys.readouterr().err
    assert main(["degrade", str(hq_dir), "-o", str(hq_dir)]) == 2
    assert "output folder is the input folder" in capsys.readouterr().err
    assert main(["degrade", str(tmp_path / "nope"), "-o", out]) == 2
    assert main(["degrade", str(hq_dir), "-o", out, "--workers", "0"]) == 2
    assert not (tmp_path / "lq").exists()


def test_config_file_and_stem_clash(hq_dir, tmp_path, capsys):
    (hq_dir / "broken.png").unlink()
    save_image(hq_dir / "astronaut.webp", np.zeros((16, 16, 3), np.uint8))  # same stem as astronaut.png
    cfg = tmp_path / "deg.yaml"
    cfg.write_text("preset: daefr\nnoise_range: null\njpeg_range: null\n")
    out = tmp_path / "lq"
    rc = main(["degrade", str(hq_dir), "-o", str(out), "--config", str(cfg)])
    assert rc == 1
    assert "astronaut.webp: output name astronaut.png already used by astronaut.png" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["images"]) == 4 and m["config"]["noise_range"] is None
    assert all(r["params"]["noise"] is None and r["params"]["jpeg_quality"] is None for r in m["images"])
    assert read_image(out / "astronaut.png").rgb.shape == (64, 64, 3)  # from the .png, not the .webp
