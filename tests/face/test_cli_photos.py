"""``osdface restore`` (whole photos) and ``osdface align`` end to end, with every awkward input."""

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from osdface.cli import main
from osdface.image import read_image


def _png_bomb(path, w=40000, h=40000):
    """A valid PNG header declaring w×h pixels (the pixel data is never needed to refuse it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, tiny_model_dir, astronaut, kodim):
    src = tmp_path_factory.mktemp("photos")
    a = Image.fromarray(astronaut)
    a.save(src / "astro.png")
    a.convert("L").save(src / "gray.png")
    alpha = np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1))
    Image.fromarray(np.dstack([astronaut, alpha]), "RGBA").save(src / "rgba.png")
    a.quantize(256).save(src / "palette.png")
    a.convert("CMYK").save(src / "cmyk.jpg", quality=95)
    Image.fromarray(np.asarray(a.convert("L")).astype(np.uint16) * 257).save(src / "deep16.png")
    # EXIF orientation 6: pixels stored rotated, to be turned upright (a sideways face is not found)
    k = Image.fromarray(kodim)
    stored = k.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(src / "exif.jpg", exif=exif, quality=95)
    Image.fromarray(np.full((120, 160, 3), 77, np.uint8)).save(src / "blank.png")
    a.save(src / "truncated.jpg", quality=90)
    data = (src / "truncated.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _png_bomb(src / "bomb.png")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path_factory.mktemp("out")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["restore", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--batch-size", "4",
                   "--report", str(out / "report.json"), "--save-faces", "--compare"])
    return src, out, rc, before, err.getvalue()


def test_exit_code_and_inputs_untouched(photo_run, capsys):
    src, out, rc, before, _ = photo_run
    assert rc == 1, "two bad inputs → exit code 1"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_every_awkward_mode_is_restored(photo_run, astronaut):
    src, out, rc, *_ = photo_run
    for stem in ("astro", "gray", "rgba", "palette", "cmyk", "deep16"):
        img = Image.open(out / f"{stem}.png")
        assert img.size == (512, 512), stem
    rgba = Image.open(out / "rgba.png")
    assert rgba.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(rgba)[..., 3], np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1)))
    exif = Image.open(out / "exif.png")
    assert exif.size == (512, 384), "EXIF orientation applied: upright size"
    gray = np.asarray(Image.open(out / "gray.png").convert("RGB"))
    assert gray.ndim == 3


def test_background_unchanged_and_no_face_photo_written_as_is(photo_run, astronaut):
    src, out, rc, *_ = photo_run
    res = np.asarray(Image.open(out / "astro.png").convert("RGB"))
    changed = np.abs(res.astype(int) - astronaut).sum(2) > 0
    ys, xs = np.nonzero(changed)
    # all changes are around the face (box [178, 62, 268, 176]), none elsewhere
    assert changed.any() and xs.min() > 100 and xs.max() < 350 and ys.min() > 0 and ys.max() < 260
    blank = np.asarray(Image.open(out / "blank.png"))
    np.testing.assert_array_equal(blank, np.full((120, 160, 3), 77, np.uint8))
    assert "blank.png: no face found; written unchanged" in photo_run[4]


def test_report_format(photo_run, yunet, astronaut, kodim):
    src, out, rc, *_ = photo_run
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["images"]
    entries = {e["input"].rsplit("/", 1)[-1]: e for e in report["images"]}
    assert set(entries) == {p.name for p in src.iterdir()}
    for e in report["images"]:
        assert list(e) == ["input", "output", "faces"]
        for f in e["faces"]:
            # identity check on by default (SFace, input vs restored crop; issue 17)
            assert list(f) == ["box", "score", "landmarks", "identity", "identity_flagged", "kept_original"]
            assert -1 <= f["identity"] <= 1 and not f["identity_flagged"] and not f["kept_original"]
            assert len(f["box"]) == 4 and len(f["landmarks"]) == 5 and all(len(p) == 2 for p in f["landmarks"])
            assert 0 < f["score"] <= 1
    assert entries["blank.png"]["faces"] == [] and entries["blank.png"]["output"].endswith("blank.png")
    assert entries["bomb.png"]["output"] is None and entries["truncated.jpg"]["output"] is None
    for name in ("astro.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep16.png", "exif.jpg"):
        assert len(entries[name]["faces"]) == 1, name
    # input-pixel coordinates: same as detecting on the input directly
    direct = yunet(astronaut)[0]
    np.testing.assert_allclose(entries["astro.png"]["faces"][0]["box"], direct.box, atol=0.01)
    np.testing.assert_allclose(entries["astro.png"]["faces"][0]["landmarks"], direct.landmarks, atol=0.01)
    upright = yunet(read_image(src / "exif.jpg").rgb)[0]
    np.testing.assert_allclose(entries["exif.jpg"]["faces"][0]["box"], upright.box, atol=0.01)
    assert upright.box[2] <= 512 and upright.box[3] <= 384 + 20


def test_errors_name_the_file(photo_run):
    err = photo_run[4]
    lines = [ln for ln in err.splitlines() if ln.startswith("osdface: error:")]
    assert len(lines) == 2, err
    bomb = next(ln for ln in lines if "bomb.png" in ln)
    assert "decompression bomb" in bomb
    trunc = next(ln for ln in lines if "truncated.jpg" in ln)
    assert "truncated" in trunc.split("truncated.jpg", 1)[1] or "cannot decode" in trunc
    assert "restored 8 of 10 inputs" in err and "2 failed" in err


def test_save_faces_and_compare_outputs(photo_run):
    src, out, rc, *_ = photo_run
    for sub in ("cropped_faces", "restored_faces", "cmp"):
        assert (out / sub / "astro_00.png").is_file(), sub
    assert Image.open(out / "cropped_faces" / "astro_00.png").size == (64, 64)
    assert Image.open(out / "cmp" / "astro_00.png").size == (128, 64)
    assert Image.open(out / "compare" / "astro.png").size == (1024, 512)
    assert not (out / "cropped_faces" / "blank_00.png").exists()


def test_align_cli(tmp_path, astronaut, group_photo):
    g, gts = group_photo
    Image.fromarray(astronaut).save(tmp_path / "astro.png")
    Image.fromarray(g).save(tmp_path / "group.png")
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(tmp_path / "empty.png")
    out = tmp_path / "aligned"
    rc = main(["align", str(tmp_path / "astro.png"), str(tmp_path / "group.png"), str(tmp_path / "empty.png"),
               "-o", str(out), "--size", "128", "--report", str(tmp_path / "r.json")])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["astro_00.png"] + [f"group_{i:02d}.png" for i in range(len(gts))]
    assert all(Image.open(out / f).size == (128, 128) for f in files)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [len(e["faces"]) for e in report["images"]] == [1, len(gts), 0]


def test_face_layer_files_are_checked_before_the_model_is_loaded(tmp_path, kodim, capsys):
    """A refused --parsing-model / --bg-upsampler file is reported before any diffusion model is loaded:
    here the model folder does not even exist, and the error is still the face-layer file's."""
    photo = tmp_path / "in.png"
    Image.fromarray(kodim).save(photo)
    bad = tmp_path / "parsing_parsenet.pth"
    bad.write_bytes(b"not a checkpoint")
    for flags in (["--parsing-model", str(bad)], ["--upscale", "2", "--bg-upsampler", str(bad)]):
        rc = main(["restore", str(photo), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("osdface: error:") and str(bad) in err[-1], err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
