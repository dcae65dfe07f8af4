"""Output paths are checked before any work: reports, manifests and evaluation reports never replace an
input, an output of the run or (without --overwrite) an existing file; names stay inside -o; osdface
temporaries are never read as images and killed runs' leftovers are cleaned from output folders.

Every refused case asserts exit code 2, one ``osdface: error:`` line naming the path, and that the whole
test folder is byte-identical afterwards (inputs untouched, nothing written).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from osdface.cli import main

LEGACY_TMP = ".face9.abcd1234.tmp.png"  # what versions before the .osdface-tmp- prefix left behind
FOREIGN_TMP = ".osdface-tmp-otherhost-4242-0123abcd-face8.png"  # another machine's run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, official_layout, tiny_vre_config):
    """A converted tiny model folder for ``osdface restore --model``."""
    from osdface.pipelines import OSDFacePipeline

    d = tmp_path_factory.mktemp("tiny_model") / "model"
    OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def astronaut():
    """A real 512-px photo with one face (scikit-image, bundled offline)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture()
def work(tmp_path, faces):
    """``tmp_path/in`` with three 64-px face crops; everything a test writes stays under ``tmp_path``."""
    d = tmp_path / "in"
    d.mkdir()
    for i, f in enumerate(faces[:3]):
        Image.fromarray(f).save(d / f"face{i}.png")
    return tmp_path


def _tree(root):
    """{relative path: sha256 (files) or 'dir' / 'link->target'} of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link->" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _refused(rc, capsys, *needles):
    """Exit code 2 and exactly one error line, naming every needle."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("osdface: error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], lines[0]
    return lines[0]


def _restore(work, model_dir, *extra, inputs=None):
    return main(["restore", *(inputs or [str(work / "in")]), "-o", str(work / "out"), "--aligned",
                 "--model", str(model_dir), *map(str, extra)])


# --- restore --report -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["input", "output", "existing", "folder", "symlink", "hardlink"])
def test_restore_report_refused(work, model_dir, capsys, target):
    src = work / "in" / "face1.png"
    report = {
        "input": src,
        "output": work / "out" / "face2.png",  # an image this run writes
        "existing": work / "report.json",
        "folder": work / "in",
        "symlink": work / "sym.json",
        "hardlink": work / "hard.json",
    }[target]
    if target == "existing":
        report.write_text("my notes\n")
    elif target == "symlink":
        report.symlink_to(src)
    elif target == "hardlink":
        os.link(src, report)
    before = _tree(work)
    rc = _restore(work, model_dir, "--report", report)
    line = _refused(rc, capsys, report)
    if target == "existing":
        assert "exists; pass --overwrite to replace it" in line
    elif target in ("symlink", "hardlink"):
        assert "input file" in line and str(src) in line
    assert _tree(work) == before


@pytest.mark.parametrize("suffix", ["/../../escaped", "..", "_a/b", ".hidden", "x\0y"])
def test_restore_suffix_cannot_leave_the_output_folder(work, model_dir, capsys, suffix):
    before = _tree(work)
    rc = _restore(work, model_dir, "--suffix", suffix)
    _refused(rc, capsys, "--suffix")
    assert _tree(work) == before


def test_restore_overwrite_replaces_the_report(work, model_dir, capsys):
    report = work / "report.json"
    report.write_text("old\n")
    inputs = _tree(work / "in")
    assert _restore(work, model_dir, "--report", report, "--overwrite") == 0
    data = json.loads(report.read_text())
    assert [(os.path.basename(e["input"]), os.path.basename(e["output"])) for e in data["images"]] == [
        ("face0.png", "face0.png"), ("face1.png", "face1.png"), ("face2.png", "face2.png")]
    assert sorted(p.name for p in (work / "out").iterdir()) == ["face0.png", "face1.png", "face2.png"]
    assert _tree(work / "in") == inputs
    # a re-run with the same report path and no --overwrite is refused before any work
    before = _tree(work)
    _refused(_restore(work, model_dir, "--report", report), capsys, report, "--overwrite")
    assert _tree(work) == before


def test_restore_output_never_replaces_another_input(work, model_dir, capsys, faces):
    """``a.jpg`` → ``in/a.png`` would replace the input ``a.png``; each input is refused, nothing runs."""
    d = work / "in"
    Image.fromarray(faces[3]).save(d / "a.jpg", quality=95)
    Image.fromarray(faces[3]).save(d / "a.png")
    before = _tree(work)
    rc = main(["restore", str(d / "a.jpg"), str(d / "a.png"), "-o", str(d), "--aligned", "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("osdface: error:")]
    assert len(lines) == 2
    assert "a.jpg" in lines[0] and "would overwrite the input" in lines[0] and str(d / "a.png") in lines[0]
    assert "a.png: output would overwrite the input" in lines[1]
    assert _tree(work) == before


def test_restore_output_folder_that_is_a_file(work, model_dir, capsys):
    before = _tree(work)
    rc = main(["restore", str(work / "in"), "-o", str(work / "in" / "face0.png"), "--aligned",
               "--model", str(model_dir)])
    _refused(rc, capsys, work / "in" / "face0.png", "not a folder")
    assert _tree(work) == before


# --- whole photos: report onto the photo, side outputs --------------------------------------------------


def test_whole_photo_report_onto_the_input_photo(tmp_path, astronaut, model_dir, capsys):
    photo = tmp_path / "photos" / "astro.png"
    photo.parent.mkdir()
    Image.fromarray(astronaut).save(photo)
    before = _tree(tmp_path)
    rc = main(["restore", str(photo), "-o", str(tmp_path / "out"), "--model", str(model_dir),
               "--report", str(photo)])
    _refused(rc, capsys, photo, "input file")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("flag,rel", [("--compare", "compare/astro.png"), ("--save-faces", "cropped_faces/astro_00.png"),
                                      ("--save-faces", "cmp/astro_03.png")])
def test_whole_photo_report_onto_a_side_output(tmp_path, astronaut, model_dir, capsys, flag, rel):
    photo = tmp_path / "astro.png"
    Image.fromarray(astronaut).save(photo)
    report = tmp_path / "out" / rel
    before = _tree(tmp_path)
    rc = main(["restore", str(photo), "-o", str(tmp_path / "out"), "--model", str(model_dir), flag,
               "--report", str(report)])
    _refused(rc, capsys, report, "also an output")
    assert _tree(tmp_path) == before


def test_whole_photo_side_output_never_replaces_an_input(tmp_path, astronaut, model_dir, capsys):
    """Restoring ``out/compare/astro.png`` into ``out`` with --compare would write onto that very input."""
    photo = tmp_path / "out" / "compare" / "astro.png"
    photo.parent.mkdir(parents=True)
    Image.fromarray(astronaut).save(photo)
    before = _tree(tmp_path)
    rc = main(["restore", str(photo), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--compare"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("osdface: error:")]
    assert len(lines) == 1 and str(photo) in lines[0] and "would overwrite the input" in lines[0]
    assert _tree(tmp_path) == before


# --- temporaries ------------------------------------------------------------------------------------------


def _plant_temps(folder, face):
    """A legacy and a foreign (a day old) temporary holding a valid PNG; returns their names."""
    for name in (LEGACY_TMP, FOREIGN_TMP):
        Image.fromarray(face).save(folder / name, format="PNG")
    old = time.time() - 3 * 24 * 3600
    os.utime(folder / FOREIGN_TMP, (old, old))
    return {LEGACY_TMP, FOREIGN_TMP}


def test_restore_ignores_temporaries_in_inputs_and_cleans_the_output_folder(work, model_dir, capsys, faces):
    _plant_temps(work / "in", faces[3])
    out = work / "out"
    out.mkdir()
    _plant_temps(out, faces[3])
    inputs = _tree(work / "in")
    rc = main(["restore", str(work / "in"), str(work / "in" / "*.png"), str(work / "in" / LEGACY_TMP), "-o", str(out),
               "--aligned", "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert rc == 1  # the temporary named explicitly is refused; the folder and the glob skip them
    lines = [ln for ln in err.splitlines() if ln.startswith("osdface: error:")]
    assert len(lines) == 1 and LEGACY_TMP in lines[0] and "temporary" in lines[0]
    assert "restored 3 of 3 inputs" in err
    assert sorted(p.name for p in out.iterdir()) == ["face0.png", "face1.png", "face2.png"]  # temps cleaned
    assert _tree(work / "in") == inputs  # the input folder's temporaries are not touched


# --- degrade --manifest -----------------------------------------------------------------------------------


@pytest.fixture()
def hq(tmp_path, faces):
    d = tmp_path / "hq"
    d.mkdir()
    for i, f in enumerate(faces[:2]):
        Image.fromarray(f).save(d / f"h{i}.png")
    return tmp_path


@pytest.mark.parametrize("target", ["hq_image", "lq_output", "existing", "folder"])
def test_degrade_manifest_refused(hq, capsys, target):
    manifest = {"hq_image": hq / "hq" / "h0.png", "lq_output": hq / "lq" / "h1.png",
                "existing": hq / "params.json", "folder": hq / "hq"}[target]
    if target == "existing":
        manifest.write_text("{}\n")
    before = _tree(hq)
    rc = main(["degrade", str(hq / "hq"), "-o", str(hq / "lq"), "--manifest", str(manifest)])
    _refused(rc, capsys, manifest)
    assert _tree(hq) == before


def test_degrade_manifest_overwrite_and_temporaries(hq, capsys, faces):
    _plant_temps(hq / "hq", faces[3])
    lq = hq / "lq"
    lq.mkdir()
    _plant_temps(lq, faces[3])
    manifest = hq / "params.json"
    manifest.write_text("old\n")
    inputs = _tree(hq / "hq")
    assert main(["degrade", str(hq / "hq"), "-o", str(lq), "--manifest", str(manifest), "--overwrite"]) == 0
    m = json.loads(manifest.read_text())
    assert [r["input"] for r in m["images"]] == ["h0.png", "h1.png"]  # temporaries not read as images
    assert sorted(p.name for p in lq.iterdir()) == ["h0.png", "h1.png"]  # leftovers cleaned
    assert _tree(hq / "hq") == inputs
    # the default manifest inside OUT_DIR is osdface's own: a re-run replaces it
    assert main(["degrade", str(hq / "hq"), "-o", str(lq)]) == 0
    assert main(["degrade", str(hq / "hq"), "-o", str(lq), "--seed", "3"]) == 0
    assert json.loads((lq / "manifest.json").read_text())["seed"] == 3


def test_degrade_library_refuses_a_manifest_onto_an_input(hq):
    from osdface.data.testset import degrade_folder
    from osdface.errors import OutputPathError

    before = _tree(hq)
    with pytest.raises(OutputPathError, match="h0.png"):
        degrade_folder(hq / "hq", hq / "lq", manifest_path=hq / "hq" / "h0.png")
    with pytest.raises(OutputPathError, match="LQ output"):
        degrade_folder(hq / "hq", hq / "lq", manifest_path=hq / "lq" / "h1.png")
    assert _tree(hq) == before


# --- evaluate --out ---------------------------------------------------------------------------------------


@pytest.fixture()
def ev(tmp_path, faces):
    """pred/ (noisy copies) and gt/ with the same stems."""
    rng = np.random.default_rng(0)
    for d in ("pred", "gt"):
        (tmp_path / d).mkdir()
    for i, f in enumerate(faces[:3]):
        Image.fromarray(f).save(tmp_path / "gt" / f"f{i}.png")
        noisy = np.clip(f.astype(int) + rng.integers(-8, 9, f.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(tmp_path / "pred" / f"f{i}.png")
    return tmp_path


def _evaluate(ev, *extra):
    return main(["evaluate", "--pred", str(ev / "pred"), "--gt", str(ev / "gt"), "--metrics", "psnr,ssim",
                 "--no-progress", "--device", "cpu", *map(str, extra)])


@pytest.mark.parametrize("target", ["gt_image", "pred_image", "existing", "existing_md", "folder", "md_itself",
                                    "compare_onto_pred", "compare_is_out"])
def test_evaluate_out_refused(ev, capsys, target):
    out, compare = ev / "r.json", None
    named = out
    if target == "gt_image":
        out = named = ev / "gt" / "f0.png"
    elif target == "pred_image":
        out = named = ev / "pred" / "f2.png"
    elif target == "existing":
        out.write_text("{}\n")
    elif target == "existing_md":
        named = ev / "r.md"
        named.write_text("# my notes\n")
    elif target == "folder":
        out = named = ev / "gt"
    elif target == "md_itself":
        out = named = ev / "r.md"  # the JSON and its Markdown sibling would be one file
    elif target == "compare_onto_pred":
        compare = named = ev / "pred" / "f1.png"
    elif target == "compare_is_out":
        compare = named = ev / "r.csv"
    before = _tree(ev)
    rc = _evaluate(ev, "--out", out, *(["--compare", compare] if compare else []))
    line = _refused(rc, capsys, named)
    if target.startswith("existing"):
        assert "exists; pass --overwrite to replace it" in line
    assert _tree(ev) == before


def test_evaluate_overwrite_missing_folder_and_temporaries(ev, capsys, faces):
    _plant_temps(ev / "pred", faces[3])
    inputs = {d: _tree(ev / d) for d in ("pred", "gt")}
    out = ev / "new" / "deeper" / "r.json"  # missing folders are created
    assert _evaluate(ev, "--out", out) == 0
    rep = json.loads(out.read_text())
    assert set(rep["per_image"]) == {"f0.png", "f1.png", "f2.png"}  # the temporaries are not read
    assert out.with_suffix(".md").is_file() and out.with_suffix(".csv").is_file()
    out.write_text("stale\n")
    capsys.readouterr()
    assert _evaluate(ev, "--out", out, "--overwrite") == 0
    assert set(json.loads(out.read_text())["per_image"]) == {"f0.png", "f1.png", "f2.png"}
    assert {d: _tree(ev / d) for d in ("pred", "gt")} == inputs


def test_evaluate_refuses_predictions_sharing_a_stem(ev, capsys, faces):
    Image.fromarray(faces[3]).save(ev / "pred" / "f0.jpg", quality=95)
    before = {d: _tree(ev / d) for d in ("pred", "gt")}
    rc = _evaluate(ev, "--out", ev / "r.json")
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("osdface: error:")]
    assert len(lines) == 1 and "f0.jpg" in lines[0] and "f0.png" in lines[0] and "ambiguous" in lines[0]
    rep = json.loads((ev / "r.json").read_text())
    assert set(rep["per_image"]) == {"f1.png", "f2.png"}  # neither f0 is scored; the others are
    assert {d: _tree(ev / d) for d in ("pred", "gt")} == before


def test_benchmark_table_out_and_method_names(ev, capsys):
    before = _tree(ev)
    rc = main(["benchmark-table", str(ev / "pred"), "--gt", str(ev / "gt"), "--metrics", "psnr", "--no-progress",
               "--out", str(ev / "gt" / "f0.png")])
    _refused(rc, capsys, ev / "gt" / "f0.png", "input file")
    rc = main(["benchmark-table", f"../x={ev / 'pred'}", "--gt", str(ev / "gt"), "--metrics", "psnr",
               "--no-progress", "--out", str(ev / "t.md")])
    _refused(rc, capsys, "'../x'", "path separator")
    assert _tree(ev) == before


# --- align --report ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["input", "crop", "existing"])
def test_align_report_refused(tmp_path, astronaut, capsys, target):
    photo = tmp_path / "astro.png"
    Image.fromarray(astronaut).save(photo)
    report = {"input": photo, "crop": tmp_path / "out" / "astro_00.png", "existing": tmp_path / "r.json"}[target]
    if target == "existing":
        report.write_text("{}\n")
    before = _tree(tmp_path)
    rc = main(["align", str(photo), "-o", str(tmp_path / "out"), "--size", "64", "--report", str(report)])
    _refused(rc, capsys, report)
    assert _tree(tmp_path) == before


def test_align_overwrite_and_temporaries(tmp_path, astronaut, capsys, faces):
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    Image.fromarray(astronaut).save(src / "astro.png")
    _plant_temps(src, faces[3])
    _plant_temps(out, faces[3])
    report = tmp_path / "r.json"
    report.write_text("old\n")
    inputs = _tree(src)
    assert main(["align", str(src), "-o", str(out), "--size", "64", "--report", str(report), "--overwrite"]) == 0
    assert [os.path.basename(e["input"]) for e in json.loads(report.read_text())["images"]] == ["astro.png"]
    assert sorted(p.name for p in out.iterdir()) == ["astro_00.png"]
    assert _tree(src) == inputs
