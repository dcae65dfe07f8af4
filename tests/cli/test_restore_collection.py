"""Whole collections through ``osdface restore`` (issue 15): a nested tree of 40 files with duplicate
names in different folders: three bad files (truncated, a text file named .jpg, a PNG declaring
40000² pixels) and one photo without faces.

The single-process run is the reference; two shards, the Ray engine (2 workers on a local Ray) and a
run killed part-way then resumed with ``--skip-existing`` must give the same files, byte for byte,
and the same report rows (each photo exactly once). Every model run here uses one torch thread:
a CPU kernel's summation order, and so the last bit of a result, can change with the thread count,
and a Ray worker with one CPU runs one thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osdface.cli import main

FOLDERS = ["", "2019", "2019/summer", "2019/winter", "2020", "2020/a/b"]
N_PHOTOS = 6 * len(FOLDERS) + 4  # + three bad files + the photo without faces
BAD = {"2019/broken.jpg": "cannot decode", "2019/winter/notes.jpg": "", "2020/a/bomb.png": "pixels"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, official_layout, tiny_vre_config):
    from osdface.pipelines import OSDFacePipeline

    d = tmp_path_factory.mktemp("tiny_model") / "model"
    OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """``IMG_000k.{jpg,png}`` in six folders (same names everywhere), astronaut faces at several sizes."""
    import cv2
    from skimage import data

    face = np.ascontiguousarray(data.astronaut()[0:320, 60:380])
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("archive") / "tree"
    k = 0
    for folder in FOLDERS:
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(6):
            side = 160 + 8 * (k % 5)
            img = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
            img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
            if k % 2:
                img = np.ascontiguousarray(img[:, ::-1])
            name = f"IMG_{i:04d}" + (".jpg" if i % 3 == 0 else ".png")
            Image.fromarray(img).save(d / name, **({"quality": 92} if name.endswith(".jpg") else {}))
            k += 1
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(root / "2020" / "empty.png")
    (root / "2019" / "broken.jpg").write_bytes((root / "2019" / "IMG_0000.jpg").read_bytes()[:500])
    (root / "2019" / "winter" / "notes.jpg").write_text("scanned by grandpa, 1987\n")
    _png_bomb(root / "2020" / "a" / "bomb.png")
    return root


def _png_bomb(path: Path, side: int = 40000) -> None:
    """A valid PNG header declaring side² pixels (refused before any pixel is decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(*reports: Path, out: Path) -> list[dict]:
    """Report rows with the output folder made relative (runs write to different folders), sorted."""
    rows = []
    for r in reports:
        for line in r.read_text().splitlines():
            row = json.loads(line)
            if row["output"] is not None:
                row["output"] = Path(row["output"]).relative_to(out).as_posix()
            rows.append(row)
    return sorted(rows, key=lambda r: r["input"])


def _restore(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["restore", *map(str, argv)])
    return rc, err.getvalue()


def _args(tree, out, model_dir, report, *extra):
    return (tree, "-o", out, "--model", model_dir, "--batch-size", "4", "--report", report, *extra)


@pytest.fixture(scope="module")
def reference(tree, model_dir, tmp_path_factory):
    """The single-process run: (output folder, report rows, stderr)."""
    base = tmp_path_factory.mktemp("single")
    before = _files(tree)
    rc, err = _restore(*_args(tree, base / "out", model_dir, base / "run.jsonl"))
    assert rc == 1, err  # the truncated file
    assert _files(tree) == before, "inputs are never modified"
    return base / "out", _rows(base / "run.jsonl", out=base / "out"), err


def test_tree_is_mirrored_and_every_photo_reported_once(reference, tree):
    out, rows, err = reference
    written = _files(out)
    assert len(written) == N_PHOTOS - len(BAD)
    for folder in FOLDERS:  # same names in every folder, no collision
        for i in range(6):
            assert f"{folder}/IMG_{i:04d}.png".lstrip("/") in written
    assert "2020/empty.png" in written
    assert [r["input"] for r in rows] == sorted(str(p) for p in tree.rglob("*") if p.is_file())
    by_name = {Path(r["input"]).relative_to(tree).as_posix(): r for r in rows}
    for name, reason in BAD.items():  # reported by name, with the reason; the others still ran
        bad = by_name[name]
        assert bad["output"] is None and bad["faces"] == [], name
        assert bad["error"].startswith(str(tree / name)) and reason in bad["error"], bad["error"]
        assert bad["error"] in err
    assert by_name["2020/empty.png"]["faces"] == [] and by_name["2020/empty.png"]["error"] is None
    assert by_name["2020/empty.png"]["output"] == "2020/empty.png"
    with_faces = [r for n, r in by_name.items() if n.rsplit("/", 1)[-1].startswith("IMG_")]
    assert len(with_faces) == N_PHOTOS - len(BAD) - 1 and all(len(r["faces"]) == 1 for r in with_faces)
    assert "empty.png: no face found" in err
    # the photo without faces is written unchanged
    np.testing.assert_array_equal(np.asarray(Image.open(out / "2020" / "empty.png")),
                                  np.asarray(Image.open(tree / "2020" / "empty.png")))


def test_two_shards_give_the_same_files_and_rows(reference, tree, model_dir, tmp_path):
    out, rows, _ = reference
    shard_rows = []
    for k in (1, 2):
        rc, err = _restore(*_args(tree, tmp_path / "out", model_dir, tmp_path / f"run-{k}.jsonl", "--shard", f"{k}/2"))
        shard_rows.append(_rows(tmp_path / f"run-{k}.jsonl", out=tmp_path / "out"))
        assert rc == (1 if any(r["error"] for r in shard_rows[-1]) else 0), err
    assert len(shard_rows[0]) + len(shard_rows[1]) == N_PHOTOS
    assert abs(len(shard_rows[0]) - len(shard_rows[1])) <= 1
    assert sorted(shard_rows[0] + shard_rows[1], key=lambda r: r["input"]) == rows
    assert _files(tmp_path / "out") == _files(out)


def test_no_overlap_gives_the_same_files(reference, tree, model_dir, tmp_path):
    """--prefetch 0 (the stages one after the other, no threads) writes the same bytes and rows."""
    out, rows, _ = reference
    rc, _ = _restore(tree, "-o", tmp_path / "out", "--model", model_dir, "--batch-size", "4", "--prefetch", "0",
                     "--report", tmp_path / "run.jsonl")
    assert rc == 1
    assert _files(tmp_path / "out") == _files(out)
    assert _rows(tmp_path / "run.jsonl", out=tmp_path / "out") == rows


@pytest.mark.slow
def test_ray_engine_two_workers_gives_the_same_files_and_rows(reference, tree, model_dir, tmp_path):
    import ray
    import ray.data

    out, rows, _ = reference
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    before = ctx.max_errored_blocks
    try:
        rc, err = _restore(*_args(tree, tmp_path / "out", model_dir, tmp_path / "run.jsonl", "--engine", "ray",
                                  "--workers", "2", "--cpus-per-worker", "0.5"))
        assert ray.data.DataContext.get_current().max_errored_blocks == before, "the caller's Ray Data context is restored"
    finally:
        ray.shutdown()
    assert rc == 1, err
    assert _rows(tmp_path / "run.jsonl", out=tmp_path / "out") == rows
    assert _files(tmp_path / "out") == _files(out)


@pytest.mark.slow
def test_killed_run_resumes_with_each_photo_reported_once(reference, tree, model_dir, tmp_path):
    out, rows, _ = reference
    report = tmp_path / "run.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "osdface", "restore", *map(str, _args(
        tree, tmp_path / "out", model_dir, report))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and (not report.exists() or report.read_bytes().count(b"\n") < 3):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed part-way"
    done_before = report.read_bytes().count(b"\n")
    assert 3 <= done_before < N_PHOTOS
    rc, err = _restore(*_args(tree, tmp_path / "out", model_dir, report, "--skip-existing"))
    assert rc == 1, err
    assert f"({done_before} skipped)" in err
    resumed = _rows(report, out=tmp_path / "out")
    assert [r["input"] for r in resumed] == [r["input"] for r in rows], "each photo reported exactly once"
    assert resumed == rows
    assert _files(tmp_path / "out") == _files(out)


def test_resume_drops_a_half_written_line_and_refuses_a_foreign_file(reference, tree, model_dir, tmp_path):
    out, rows, _ = reference
    report = tmp_path / "run.jsonl"
    whole = [json.dumps({**r, "output": str(out / r["output"]) if r["output"] else None}) for r in rows[:5]]
    report.write_text("\n".join(whole) + "\n" + whole[5 - 1][:20])  # a kill in the middle of a line
    rc, err = _restore(*_args(tree, tmp_path / "out", model_dir, report, "--skip-existing"))
    assert rc == 1 and "(5 skipped)" in err
    lines = report.read_text().splitlines()
    assert len(lines) == N_PHOTOS and all(json.loads(line) for line in lines)
    report.write_text("not json\n")
    rc, err = _restore(*_args(tree, tmp_path / "out2", model_dir, report, "--skip-existing"))
    assert rc == 2 and f"{report}: line 1 is not JSON" in err
    rc, err = _restore(*_args(tree, tmp_path / "out2", model_dir, report))
    assert rc == 2 and "pass --overwrite" in err


def test_input_list_ext_auto_and_stdin(reference, tree, model_dir, tmp_path, monkeypatch):
    """A list with relative paths mirrors them below the list's folder; --ext auto keeps jpg as jpg."""
    listed = ["tree/2019/IMG_0000.jpg", "tree/2020/a/b/IMG_0001.png", "tree/2019/summer", str(tree / "IMG_0002.png"), ""]
    lst = tree.parent / "photos.txt"
    lst.write_text("\n".join(listed) + "\n")
    rc, err = _restore("--input-list", lst, "-o", tmp_path / "out", "--model", model_dir, "--batch-size", "4",
                       "--ext", "auto")
    assert rc == 0, err
    got = sorted(_files(tmp_path / "out"))
    assert got == sorted(["tree/2019/IMG_0000.jpg", "tree/2020/a/b/IMG_0001.png", "tree/IMG_0002.png"]
                         + [f"IMG_{i:04d}.{'jpg' if i % 3 == 0 else 'png'}" for i in range(6)])
    assert Image.open(tmp_path / "out" / "tree/2019/IMG_0000.jpg").format == "JPEG"
    # the same photo as png is the reference output
    assert _files(tmp_path / "out")["tree/2020/a/b/IMG_0001.png"] == (reference[0] / "2020/a/b/IMG_0001.png").read_bytes()
    monkeypatch.chdir(tree)
    monkeypatch.setattr(sys, "stdin", io.StringIO("2019/winter/IMG_0004.png\n"))
    rc, err = _restore("--input-list", "-", "-o", tmp_path / "out3", "--model", model_dir)
    assert rc == 0, err
    assert sorted(_files(tmp_path / "out3")) == ["2019/winter/IMG_0004.png"]


def test_output_folder_inside_the_input_tree_is_not_scanned(tree, model_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tree / "2020", src)
    (src / "a" / "bomb.png").unlink()
    for _ in range(2):  # the second run would see the first run's outputs if OUT were scanned
        rc, err = _restore(src, "-o", src / "restored", "--model", model_dir, "--skip-existing")
        assert rc == 0, err
    names = [f"IMG_{i:04d}.png" for i in range(6)]
    assert sorted(_files(src / "restored")) == sorted(["empty.png", *names, *(f"a/b/{n}" for n in names)])


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_is_refused(shard, tree, model_dir, tmp_path, capsys):
    assert main(["restore", str(tree), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--shard", shard]) == 2
    assert f"--shard {shard!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shards_cover_every_photo_once():
    from osdface.batch.inputs import shard_indices

    paths = [Path(f"d{i % 7}/p{i}.jpg") for i in range(101)]
    parts = [shard_indices(paths, k, 4) for k in range(1, 5)]
    assert sorted(i for p in parts for i in p) == list(range(101))
    # the split depends on the paths, not on their order on the command line
    rp = list(reversed(paths))
    rev = [sorted(rp[i] for i in shard_indices(rp, k, 4)) for k in range(1, 5)]
    assert rev == [sorted(paths[i] for i in p) for p in parts]


class CrashOnceRestorer:
    """Builds a model-stage restorer whose first model call anywhere kills its process (``os._exit``):
    a real worker crash, to be survived by Ray restarting the actor and retrying the call."""

    def __init__(self, model_dir: Path, marker: Path) -> None:
        self.model_dir, self.marker = model_dir, marker

    def __call__(self):
        from osdface.face import FaceRestorer
        from osdface.pipelines import OSDFacePipeline

        marker = self.marker

        class Crashing(FaceRestorer):
            def restore_crops(self, crops):
                if not marker.exists():
                    marker.write_text("crashed\n")
                    os._exit(1)
                return super().restore_crops(crops)

        return Crashing(OSDFacePipeline.from_pretrained(self.model_dir), detector=None, batch_size=4)


@pytest.mark.slow
def test_ray_crashed_worker_is_restarted_and_its_photos_retried(reference, tree, model_dir, tmp_path):
    """From Python: the model actor dies in its first call; Ray restarts it, the call is retried and
    every photo is reported once with the single-process bytes."""
    import functools

    import ray

    from osdface.batch.inputs import collect_inputs
    from osdface.batch.ray_engine import RayStages, restore_collection_ray
    from osdface.batch.stages import PhotoJob
    from osdface.face import FaceRestorer
    from osdface.io.model_folders import read_model_folder

    out, rows, _ = reference
    photos, _ = collect_inputs([tree / "2019"])
    jobs = [PhotoJob(p.path, p.output(tmp_path / "out", "png")) for p in photos]
    stages = RayStages(face_stage=functools.partial(FaceRestorer, None, detector="yunet",
                                                         face_size=read_model_folder(model_dir).resolution),
                       model_stage=CrashOnceRestorer(model_dir, tmp_path / "crashed"))
    got: list[dict] = []
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent),
                                                            "OMP_NUM_THREADS": "1"}})
    try:
        stats = restore_collection_ray(jobs, stages, got.append, workers=1, cpus_per_worker=1, gpus_per_worker=0,
                                       photos_per_call=4)
    finally:
        ray.shutdown()
    assert (tmp_path / "crashed").exists(), "the worker really crashed"
    assert stats.lost == [] and stats.photos == len(jobs) == 20
    expected = {r["input"]: r for r in rows if r["input"].startswith(str(tree / "2019") + "/")}
    assert sorted(r["input"] for r in got) == sorted(expected)
    def detections(row: dict) -> list[dict]:  # the CLI also scores identity per face (issue 17); this restorer does not
        return [{k: f[k] for k in ("box", "score", "landmarks")} for f in row["faces"]]

    for r in got:
        rel = Path(r["output"]).relative_to(tmp_path / "out").as_posix() if r["output"] else None
        want = expected[r["input"]]
        assert (rel and "2019/" + rel, r["error"], detections(r)) == (want["output"], want["error"], detections(want))
    assert {f"2019/{k}": v for k, v in _files(tmp_path / "out").items()} == {
        k: v for k, v in _files(out).items() if k.startswith("2019/")}


def test_aligned_crops_stream_their_rows(faces, model_dir, tmp_path):
    """--aligned with a .jsonl report: a row per crop as it is written (mirrored tree, a bad crop named)."""
    src = tmp_path / "crops"
    (src / "set1").mkdir(parents=True)
    for i, f in enumerate(faces[:3]):
        Image.fromarray(f).save(src / ("set1" if i else ".") / f"face{i}.png")
    Image.fromarray(faces[3][:, :40]).save(src / "set1" / "wide.png")  # not square: refused by name
    rc, err = _restore(src, "-o", tmp_path / "out", "--aligned", "--model", model_dir, "--batch-size", "2",
                       "--report", tmp_path / "run.jsonl")
    assert rc == 1, err
    rows = _rows(tmp_path / "run.jsonl", out=tmp_path / "out")
    assert [(Path(r["input"]).relative_to(src).as_posix(), r["output"], r["faces"]) for r in rows] == [
        ("face0.png", "face0.png", []), ("set1/face1.png", "set1/face1.png", []),
        ("set1/face2.png", "set1/face2.png", []), ("set1/wide.png", None, [])]
    assert [r["error"] is None for r in rows] == [True, True, True, False] and "square" in rows[3]["error"]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_faceless_photos_after_a_face_do_not_pile_up(tree, model_dir, tmp_path, prefetch):
    """--batch-size 8, one portrait then many photos without faces: the portrait's face is run
    before a full batch is there, so the engine holds a bounded number of photos."""
    from osdface.batch.local import restore_collection
    from osdface.batch.stages import PhotoJob
    from osdface.face import FaceRestorer
    from osdface.pipelines import OSDFacePipeline

    restorer = FaceRestorer(OSDFacePipeline.from_pretrained(model_dir), detector="yunet", batch_size=8)
    n = 40
    read: list[int] = []

    def jobs():
        for i in range(n):
            read.append(i)
            src = tree / "IMG_0000.jpg" if i == 0 else tree / "2020" / "empty.png"
            yield PhotoJob(src, tmp_path / f"{i:03d}.png")

    seen: list[tuple[int, dict]] = []
    restore_collection(restorer, jobs(), lambda row: seen.append((len(read), row)), prefetch=prefetch)
    assert [len(r["faces"]) for _, r in seen] == [1] + [0] * (n - 1)
    assert all(r["error"] is None for _, r in seen)
    bound = max(prefetch, 8) + 1 + 2 * prefetch + 2  # the model stage, both queues, one item in each thread
    assert seen[0][0] <= bound, f"{seen[0][0]} of {n} photos read before the first was written"


def test_a_file_name_that_is_not_utf8_is_reported_and_resumed(tree, model_dir, tmp_path):
    """b'caf\\xe9.jpg' (Latin-1 on a UTF-8 system) decodes to a lone surrogate: the report row is
    written (JSON escapes it), and a re-run with --skip-existing finds it in the report."""
    src = tmp_path / "src"
    src.mkdir()
    odd = Path(os.fsdecode(os.fsencode(str(src)) + b"/caf\xe9.jpg"))
    odd.write_bytes((tree / "IMG_0000.jpg").read_bytes())
    (src / "plain.png").write_bytes((tree / "IMG_0001.png").read_bytes())
    report = tmp_path / "run.jsonl"
    rc, err = _restore(src, "-o", tmp_path / "out", "--model", model_dir, "--report", report)
    assert rc == 0, err
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["input"] for r in rows) == sorted([str(odd), str(src / "plain.png")])
    assert (tmp_path / "out" / "caf\udce9.png").exists()
    rc, err = _restore(src, "-o", tmp_path / "out", "--model", model_dir, "--report", report,
                       "--skip-existing")
    assert rc == 0 and "all 2 outputs exist already" in err, err


def test_input_list_entry_outside_its_folder_gets_the_flat_name(tree, model_dir, tmp_path):
    """``../other/x.jpg`` in a list is normalised and lies outside the list's folder: OUT/x.png,
    not OUT/../other/x.png (which made the whole run refuse)."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes((tree / "IMG_0001.png").read_bytes())
    lst = tmp_path / "lists" / "photos.txt"
    lst.write_text("../other/x.png\n")
    rc, err = _restore("--input-list", lst, "-o", tmp_path / "out", "--model", model_dir)
    assert rc == 0, err
    assert sorted(_files(tmp_path / "out")) == ["x.png"]


def test_side_outputs_do_not_collide_with_other_outputs(tree, model_dir, tmp_path):
    """--compare / --save-faces outputs are planned like main outputs: in/x.png's compare sheet would be
    out/compare/x.png, already in/compare/x.png's output; in/cropped_faces/a_00.png's output would be
    one of in/a.png's face crops. The later input is refused by name; nothing is written twice."""
    src = tmp_path / "in"
    for name in ("x.png", "compare/x.png", "a.png", "cropped_faces/a_00.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((tree / "IMG_0001.png").read_bytes())
    rc, err = _restore(src, "-o", tmp_path / "out", "--model", model_dir, "--compare", "--save-faces")
    assert rc == 1, err
    assert (f"{src / 'x.png'}: side output (--compare/--save-faces) compare/x.png already used by "
            f"{src / 'compare' / 'x.png'}") in err
    assert f"{src / 'cropped_faces' / 'a_00.png'}: output name cropped_faces/a_00.png already used by {src / 'a.png'}" in err
    assert "restored 2 of 2 inputs" in err and "2 failed" in err
    # out/compare/x.png is in/compare/x.png restored, not in/x.png's side-by-side sheet (twice as wide)
    assert Image.open(tmp_path / "out" / "compare" / "x.png").size == Image.open(src / "compare" / "x.png").size
    assert sorted(_files(tmp_path / "out")) == sorted([
        "a.png", "compare/a.png", "cropped_faces/a_00.png", "restored_faces/a_00.png", "cmp/a_00.png",
        "compare/x.png", "compare/compare/x.png", "compare/cropped_faces/x_00.png",
        "compare/restored_faces/x_00.png", "compare/cmp/x_00.png"])


def test_identity_summary_keeps_running_totals_not_faces():
    """The end-of-run identity line is computed from running totals: no face's JSON is kept."""
    from osdface.cli.face_quality_args import IdentityTotals, collect_identity, identity_summary

    rows: list[dict] = []
    totals = IdentityTotals()
    on_row = collect_identity(rows.append, totals)
    assert identity_summary(totals) is None
    for i in range(1000):
        on_row({"input": f"p{i}.png", "faces": [{"identity": 0.5 + (i % 5) / 10, "identity_flagged": i % 100 == 0,
                                                 "kept_original": i % 200 == 0}], "error": None})
    on_row({"input": "bad.png", "faces": [], "error": "x"})
    assert len(rows) == 1001
    assert all(isinstance(v, (int, float)) for v in vars(totals).values()), "constant memory"
    assert identity_summary(totals) == ("identity (SFace, input vs restored face): mean 0.700, min 0.500 over "
                                        "1000 faces; 10 below --min-identity (5 kept original)")


def test_ray_workers_taking_every_local_cpu_are_refused():
    """On a local Ray this call started, workers that leave no CPU for the read/write tasks would stall
    forever: refused with the numbers and what to pass. On a cluster (an autoscaler may add nodes): a warning."""
    from osdface.batch.ray_engine import _check_resources
    from osdface.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match=r"--workers 2 x --cpus-per-worker 1 .* local Ray's 2 CPUs.*"
                                                  r"pass --cpus-per-worker 0\.5"):
        _check_resources({"CPU": 2.0}, 2, 0.0, 1.0, 1.0, local=True)
    with pytest.raises(InvalidSettingError, match=r"need 2 GPUs; the local Ray has 1: pass --workers 1"):
        _check_resources({"CPU": 8.0, "GPU": 1.0}, 2, 1.0, 1.0, 1.0, local=True)
    _check_resources({"CPU": 2.0}, 2, 0.0, 0.5, 1.0, local=True)  # the docs' laptop example on 2 cores
    _check_resources({"CPU": 2.0}, 2, 0.0, 1.0, 1.0, local=False)  # a cluster: warned only


@pytest.mark.slow
def test_ray_local_start_refuses_workers_that_take_every_cpu(tmp_path):
    import ray

    from osdface.batch.ray_engine import RayStages, restore_collection_ray
    from osdface.batch.stages import PhotoJob
    from osdface.errors import InvalidSettingError

    assert not ray.is_initialized()
    with pytest.raises(InvalidSettingError, match="pass --cpus-per-worker 0.5"):
        restore_collection_ray([PhotoJob(tmp_path / "a.png", tmp_path / "out" / "a.png")],
                               RayStages(face_stage=dict, model_stage=dict), print, workers=2, cpus_per_worker=1,
                               gpus_per_worker=0,
                               init_kwargs={"num_cpus": 2, "object_store_memory": 200 * 1024**2,
                                            "_node_ip_address": "127.0.0.1"})
    assert not ray.is_initialized(), "the Ray this call started is shut down"


def test_an_unreadable_subfolder_is_a_problem_naming_it(tree, tmp_path):
    """A subfolder os.walk cannot list is reported by name, not skipped silently. (Made unreadable by a
    path longer than PATH_MAX, which works as root too; chmod 000 does not stop root.)"""
    from osdface.batch.inputs import collect_inputs

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.png").write_bytes((tree / "IMG_0001.png").read_bytes())
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 250 characters: > 4096, so the deepest folder cannot be opened by path
            os.mkdir("d" * 250, dir_fd=fd)
            nxt = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    photos, problems = collect_inputs([root])
    assert [p.path for p in photos] == [root / "a.png"]
    assert len(problems) == 1 and problems[0].startswith(str(root / ("d" * 250)))
    assert "cannot read the folder" in problems[0]


def test_input_list_with_a_bom_and_a_name_that_is_not_utf8(tmp_path):
    """A list saved with a UTF-8 BOM does not glue it to the first name; a name that is not UTF-8 is
    read as the file system spells it (as from standard input) instead of refusing the whole list."""
    from osdface.batch.inputs import read_input_list

    lst = tmp_path / "photos.txt"
    lst.write_bytes(b"\xef\xbb\xbfa.png\r\ncaf\xe9.png\n\nsub/b c#.png\n")
    entries, root = read_input_list(lst)
    assert root == tmp_path.resolve()
    assert entries == [root / "a.png", Path(os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9.png")),
                       root / "sub" / "b c#.png"]


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_collision_winner_and_shards_do_not_depend_on_argument_order(tree, model_dir, tmp_path, order):
    """a/x.png and b/x.png named directly both want OUT/x.png: a/x.png (first by path) wins whatever
    the argument order, so shard 2/2 (b/x.png) is the refused one either way."""
    for d in "ab":
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.png").write_bytes((tree / "IMG_0001.png").read_bytes())
    rc, err = _restore(*(tmp_path / d / "x.png" for d in order), "-o", tmp_path / "out", "--model", model_dir,
                       "--shard", "2/2")
    assert rc == 1, err
    assert f"{tmp_path / 'b' / 'x.png'}: output name x.png already used by {tmp_path / 'a' / 'x.png'}" in err
    assert not (tmp_path / "out" / "x.png").exists()


def test_a_glob_takes_only_image_files(tree, tmp_path):
    """dir/* filters by the image extensions, as a folder scan does: a .txt file is not an input."""
    from osdface.batch.inputs import collect_inputs

    (tmp_path / "a.png").write_bytes((tree / "IMG_0001.png").read_bytes())
    (tmp_path / "notes.txt").write_text("scanned in 1987\n")
    photos, problems = collect_inputs([str(tmp_path / "*")])
    assert [p.path for p in photos] == [tmp_path / "a.png"] and problems == []
    photos, problems = collect_inputs([str(tmp_path / "*.txt")])
    assert photos == [] and problems == [f"{tmp_path / '*.txt'}: pattern matches no images (.png, .jpg, .jpeg, .bmp, "
                                         ".webp, .tif, .tiff)"]


def test_stage_helpers_turn_failures_into_rows(tree, model_dir, tmp_path):
    """prepare_or_error / write_or_failure_row, shared by both engines: a bad file comes back as its
    exception, a write that fails as a ``cannot write`` row, an earlier error as its row."""
    from osdface.batch.stages import PhotoJob, error_message, prepare_or_error, write_or_failure_row
    from osdface.face import FaceRestorer
    from osdface.io.model_folders import read_model_folder

    restorer = FaceRestorer(None, detector="yunet", face_size=read_model_folder(model_dir).resolution)
    bad = PhotoJob(tree / "2019" / "broken.jpg", tmp_path / "broken.png")
    exc = prepare_or_error(restorer, bad)
    assert isinstance(exc, Exception) and "cannot decode" in error_message(bad, exc)
    assert write_or_failure_row(restorer, bad, None, [], error="gone") == {
        "input": str(bad.input), "output": None, "faces": [], "error": "gone"}
    (tmp_path / "file").write_text("")
    job = PhotoJob(tree / "2020" / "empty.png", tmp_path / "file" / "empty.png")  # its folder is a file
    prepared = prepare_or_error(restorer, job)
    row = write_or_failure_row(restorer, job, prepared, [])
    assert row["output"] is None and row["error"].startswith(f"{job.input}: cannot write {job.output}: ")
    ok = PhotoJob(job.input, tmp_path / "out" / "empty.png")
    assert write_or_failure_row(restorer, ok, prepared, [])["output"] == str(ok.output)
