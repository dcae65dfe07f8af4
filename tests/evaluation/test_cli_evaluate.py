"""``osdface evaluate`` / ``benchmark-table`` / ``weights`` end to end on real images."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from osdface.cli import main


@pytest.fixture()
def folders(tmp_path, reference_dir):
    pred, gt = tmp_path / "method_a", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for n in ("I04", "I06", "I08"):
        # pred as PNG, GT as BMP: matched by stem
        Image.open(reference_dir / f"calibration/dist_dir/{n}.bmp").save(pred / f"{n}.png")
        shutil.copy(reference_dir / f"calibration/ref_dir/{n}.bmp", gt / f"{n}.bmp")
    return pred, gt


def test_evaluate_end_to_end(folders, tmp_path, metric_weights_dir, capsys):
    pred, gt = folders
    out = tmp_path / "out" / "report.json"
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,lpips,dists,niqe",
               "--out", str(out), "--weights-dir", str(metric_weights_dir), "--device", "cpu", "--no-progress",
               "--compare", str(tmp_path / "sheet.png"), "--lq", str(pred)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["per_image"]) == {"I04.png", "I06.png", "I08.png"}
    assert rep["per_image"]["I04.png"]["lpips"] == pytest.approx(0.2572, abs=1e-4)
    assert rep["per_image"]["I06.png"]["dists"] == pytest.approx(0.0682, abs=1e-4)
    assert rep["metrics"]["lpips"] == pytest.approx(np.mean([0.2572, 0.0508, 0.0521]), abs=2e-4)
    assert "| Method | LPIPS↓ | DISTS↓ | NIQE↓ | PSNR↑ |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".csv").read_text().startswith("file,psnr,lpips,dists,niqe")
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (3 * 256, 3 * 256, 3)
    assert "LPIPS↓" in capsys.readouterr().out


def test_evaluate_bad_inputs_keep_going(folders, tmp_path, metric_weights_dir, capsys):
    pred, gt = folders
    (pred / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 64)).save(pred / "nogt.png")
    before = sorted(p.read_bytes() for p in pred.iterdir())
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim", "--out", str(out),
               "--no-progress", "--weights-dir", str(metric_weights_dir), "--compare", str(tmp_path / "c.html")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "nogt.png: no GT image" in err and "broken" in err
    rep = json.loads(out.read_text())
    assert set(rep["per_image"]) == {"I04.png", "I06.png", "I08.png"}
    assert len(rep["problems"]) == 2
    assert "I04.png" in (tmp_path / "c.html").read_text()
    assert sorted(p.read_bytes() for p in pred.iterdir()) == before  # inputs untouched


def test_evaluate_usage_errors(folders, tmp_path, capsys):
    pred, gt = folders
    assert main(["evaluate", "--pred", str(pred), "--metrics", "lpipz", "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown metric 'lpipz'; choose from" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--metrics", "psnr", "--out", str(tmp_path / "r.json")]) == 2
    assert "need --gt" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--metrics", "musiq",
                 "--weights-dir", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "musiq_koniq.pth" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_benchmark_table_and_fid(tmp_path, reference_dir, metric_weights_dir, capsys, monkeypatch):
    monkeypatch.setenv("OSDFACE_HOME", str(tmp_path / "home"))  # FID feature cache goes here
    gt, pred, other = tmp_path / "gt", tmp_path / "method_a", tmp_path / "method_b"
    for d in (gt, pred, other):
        d.mkdir()
    for i, n in enumerate(("I04", "I06", "I08")):
        ref = Image.open(reference_dir / f"calibration/ref_dir/{n}.bmp").crop((128, 64, 256, 192))
        dist = Image.open(reference_dir / f"calibration/dist_dir/{n}.bmp").crop((128, 64, 256, 192))
        ref.save(gt / f"{i}.png")
        ref.save(other / f"{i}.png")  # "perfect" method: the GT itself
        dist.save(pred / f"{i}.png")
    rc = main(["benchmark-table", str(pred), f"perfect={other}", "--gt", str(gt), "--metrics", "lpips,psnr,fid",
               "--weights-dir", str(metric_weights_dir), "--no-progress", "--out", str(tmp_path / "t1.md")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| Method | LPIPS↓ | FID↓ | PSNR↑ |" in table
    perfect = next(line for line in table.splitlines() if line.startswith("| perfect"))
    assert perfect.startswith("| perfect | **0.0000** |")  # best LPIPS
    assert perfect.split("|")[-2].strip().strip("*_") == "inf"  # PSNR of identical images
    assert (tmp_path / "t1.md").read_text() == table.rstrip("\n") + "\n"
    rep = json.loads((tmp_path / "t1_perfect.json").read_text())
    assert rep["metrics"]["fid"] == pytest.approx(0.0, abs=1e-2)
    rep_a = json.loads((tmp_path / "t1_method_a.json").read_text())
    assert rep_a["metrics"]["fid"] > 1.0
    assert len(list((tmp_path / "home/cache/fid").glob("*.npy"))) == 3  # method_a, perfect, GT (GT computed once)


def test_weights_list_and_install_present(metric_weights_dir, capsys):
    assert main(["weights", "list", "--dir", str(metric_weights_dir)]) == 0
    out = capsys.readouterr().out
    assert "present  lpips_alex.safetensors" in out
    assert "MISSING  musiq_koniq.pth" in out and "put it in" in out
    assert main(["weights", "install", "--dir", str(metric_weights_dir), "--no-download"]) == 0
    assert "present" in capsys.readouterr().out
