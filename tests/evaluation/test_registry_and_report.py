import json
import math

import pytest
import torch

from osdface.evaluation.metrics import METRICS, create_metric, list_metrics
from osdface.evaluation.report import EvalReport, benchmark_table
from osdface.weights import WeightsNotFoundError


def test_registry_names_and_directions():
    want = {"psnr", "ssim", "lpips", "lpips_vgg", "dists", "niqe", "fid", "musiq", "maniqa", "clipiqa", "ids", "lmd"}
    assert want <= set(list_metrics())
    lower = {n for n, i in METRICS.items() if i.lower_better}
    assert {"lpips", "lpips_vgg", "dists", "niqe", "fid", "ids", "ids_facenet", "lmd"} == lower
    nr = {n for n, i in METRICS.items() if not i.full_reference}
    assert nr == {"niqe", "musiq", "maniqa", "clipiqa"}
    with pytest.raises(KeyError, match="unknown metric 'lpipz'; choose from"):
        create_metric("lpipz")


@pytest.mark.parametrize("name,filename", [("musiq", "musiq_koniq.pth"), ("maniqa", "maniqa_koniq.pth"),
                                           ("clipiqa", "RN50.pt"), ("lmd", "alignment_WFLW_4HG.pth"),
                                           ("niqe", "niqe_pris_params.npz"), ("lpips", "lpips_alex.safetensors"),
                                           ("fid", "fid_inception_v3.safetensors")])
def test_missing_weights_name_the_file(tmp_path, name, filename):
    with pytest.raises(WeightsNotFoundError) as e:
        create_metric(name, weights_dir=tmp_path)
    assert filename in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("name,filename", [("musiq", "musiq_koniq.pth"), ("maniqa", "maniqa_koniq.pth"),
                                           ("clipiqa", "RN50.pt"), ("lmd", "alignment_WFLW_4HG.pth")])
def test_ported_networks_refuse_a_broken_file_by_name(tmp_path, name, filename):
    # the user-file metrics are real networks now: a file that is not their checkpoint is refused by name
    (tmp_path / filename).write_bytes(b"not a checkpoint")
    with pytest.raises((ValueError, RuntimeError)) as e:
        create_metric(name, weights_dir=tmp_path)
    assert str(tmp_path / filename) in str(e.value)


def test_random_init_deep_metrics_run():
    x = torch.rand(2, 3, 64, 64)
    y = torch.rand(2, 3, 64, 64)
    for name in ("lpips", "lpips_vgg", "dists"):
        m = create_metric(name, pretrained=False)
        v = m(x, y)
        assert v.shape == (2,) and torch.isfinite(v).all()
        assert m(x, x).abs().max() < 1e-5


def _report(lp, ds):
    return EvalReport(metrics={"lpips": lp, "dists": ds, "psnr": 20.0},
                      per_image={"a.png": {"lpips": lp, "dists": ds, "psnr": math.inf}},
                      lower_better={"lpips": True, "dists": True, "psnr": False})


def test_report_formats_roundtrip(tmp_path):
    r = _report(0.3, 0.2)
    paths = r.save(tmp_path / "report.json")
    d = json.loads(paths["json"].read_text())
    assert d["metrics"]["lpips"] == 0.3 and d["per_image"]["a.png"]["dists"] == 0.2
    assert d["per_image"]["a.png"]["psnr"] is None  # inf is not valid JSON
    back = EvalReport.from_json(paths["json"].read_text())
    assert back.metrics == r.metrics
    csv = paths["csv"].read_text().splitlines()
    assert csv[0] == "file,lpips,dists,psnr" and csv[-1].startswith("mean,0.300000,0.200000,20.000000")
    md = paths["markdown"].read_text()
    # paper layout: LPIPS, DISTS first (Table 1 order), arrows from lower_better
    assert md.splitlines()[0] == "| Method | LPIPS↓ | DISTS↓ | PSNR↑ |"


def test_benchmark_table_marks_best_and_second():
    table = benchmark_table({"A": _report(0.30, 0.25), "B": _report(0.20, 0.30), "C": _report(0.40, 0.10)})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "**0.2000**" in rows["B"] and "_0.3000_" in rows["A"]  # LPIPS: lower is better
    assert "**0.1000**" in rows["C"] and "_0.2500_" in rows["A"]  # DISTS
