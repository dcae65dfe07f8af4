"""Issue 12 for ``osdface convert`` and ``osdface export``: never lose a user's file, never fall over
on a hostile one.

* every broken, implausible or unsafe input file is one ``osdface: error:`` line naming it, exit 2,
  no output folder, no temporary left, the inputs byte-identical;
* the output is written into a temporary folder and renamed when complete: a killed run's leftover
  is removed by the next run; the finished folder and files have the permissions of plainly written
  ones (not safetensors' 0600);
* export validates the checkpoint it reads (a named bad checkpoint is an error; a run folder falls
  back to its newest intact checkpoint) and never overwrites existing release files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from osdface.cli import main
from osdface.testing import cli_error_line, snapshot_files

GEN_TINY = Path(__file__).resolve().parents[2] / "configs" / "generator-tiny.yaml"
OFFICIAL = ("associate_2.ckpt", "embedding_change_weights.pth", "pytorch_lora_weights.safetensors")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".osdface-tmp-")) if folder.is_dir() else []


def plain_modes() -> tuple[int, int]:
    """(file mode, folder mode) a plain open()/mkdir() gives under this process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask, 0o777 & ~umask


def assert_plain_permissions(*paths: Path) -> None:
    file_mode, dir_mode = plain_modes()
    for root in paths:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            assert p.stat().st_mode & 0o777 == (dir_mode if p.is_dir() else file_mode), (p, oct(p.stat().st_mode))


def leave_killed_run(target: Path) -> list[str]:
    """What ``kill -9`` during a write of the folder ``target`` leaves: a real process is killed inside
    :func:`osdface.utils.io.atomic_dir` after writing half a file. Returns the leftover names."""
    code = ("import os, signal, sys\n"
            "from osdface.utils.io import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'unet').mkdir()\n"
            "    (tmp / 'unet' / 'diffusion_pytorch_model.safetensors').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    assert result.returncode == -signal.SIGKILL
    left = temporaries(target.parent)
    assert left and not target.exists()
    return left


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny official release: (SD 2.1-base folder, OSDFace weights folder), under one root."""
    from osdface.testing import write_official_layout

    return write_official_layout(tmp_path_factory.mktemp("release") / "root", seed=0)


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, release):
    """A finished 2-step stage-2 run (fine-tuning the tiny release), a checkpoint per step. Read-only."""
    from osdface.testing import synthetic_faces

    root = tmp_path_factory.mktemp("gen")
    faces = root / "faces"
    faces.mkdir()
    for i, f in enumerate(synthetic_faces(2, 64, seed=3)):
        cv2.imwrite(str(faces / f"f{i}.png"), f[:, :, ::-1])
    run = root / "run"
    base, weights = release
    argv = ["train", "generator", "--config", str(GEN_TINY), "--data", str(faces), "-o", str(run), "--cpu",
            "--base-model", str(base), "--weights", str(weights), "--max-steps", "2",
            "--set", "loss.ea_dists=0", "loss.identity=0", "data.val_images=0", "train.val_every=0",
            "train.batch_size=1", "train.ckpt_every=1", "train.keep_last=0"]
    assert main(argv) == 0
    return run


def copy_release(release, dest: Path) -> tuple[Path, Path]:
    base, weights = release
    shutil.copytree(base.parent, dest)
    return dest / base.name, dest / weights.name


# ------------------------------------------------------------------------------------------ convert
def _unsafe_pickle(f: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {"vqvae_LQ.x": torch.zeros(1)}, "payload": Evil()}, f)


def _set_json(**fields):
    def edit(f: Path) -> None:
        f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))
    return edit


HOSTILE_RELEASE = [
    ("weights", "associate_2.ckpt", _unsafe_pickle, "refusing to load"),
    ("weights", "associate_2.ckpt", lambda f: f.write_bytes(f.read_bytes()[:5000]), "associate_2.ckpt"),
    ("weights", "embedding_change_weights.pth", lambda f: f.write_bytes(b"hello world"), "not a PyTorch checkpoint"),
    ("weights", "pytorch_lora_weights.safetensors",
     lambda f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"), "not a valid safetensors file"),
    ("weights", "pytorch_lora_weights.safetensors",
     lambda f: __import__("safetensors.torch").torch.save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 2)},
                                                               str(f)), "unet.nowhere.lora_A.weight"),
    ("base", "unet/config.json", lambda f: f.write_text("{not json"), "malformed UNet config"),
    ("base", "unet/config.json", _set_json(block_out_channels=[100000, 100000]), "block_out_channels"),
    ("base", "vae/diffusion_pytorch_model.safetensors", lambda f: f.write_bytes(b"abc"), "not a valid safetensors"),
]


@pytest.mark.parametrize("where, name, tamper, reason", HOSTILE_RELEASE,
                         ids=[f"{n}-{r.split()[0]}" for _, n, _, r in HOSTILE_RELEASE])
def test_convert_hostile_release_files_are_one_line_and_leave_nothing(tmp_path, release, capsys, where, name,
                                                                      tamper, reason):
    base, weights = copy_release(release, tmp_path / "release")
    target = (weights if where == "weights" else base) / name
    tamper(target)
    before = snapshot_files(tmp_path / "release")
    out = tmp_path / "out" / "model"
    code = main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(out)])
    assert code == 2
    line = cli_error_line(capsys.readouterr().err)
    assert str(target) in line and reason in line, line
    assert snapshot_files(tmp_path / "release") == before
    assert not out.exists() and temporaries(out.parent) == []


def test_convert_cleans_a_killed_runs_leftover_and_writes_readable_files(tmp_path, release, capsys):
    base, weights = release
    before = snapshot_files(base.parent)
    out = tmp_path / "models" / "osdface"
    leftover = leave_killed_run(out)
    assert main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert temporaries(out.parent) == [], leftover
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert_plain_permissions(out)  # 0755 folders, 0644 files under umask 022 (safetensors alone: 0600)
    assert snapshot_files(base.parent) == before
    from osdface.pipelines import OSDFacePipeline

    OSDFacePipeline.from_pretrained(out)  # the folder is complete


def test_convert_never_writes_into_a_non_empty_folder_or_over_a_file(tmp_path, release, capsys):
    base, weights = release
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = ["convert", "--base-model", str(base), "--weights", str(weights), "-o"]
    assert main([*argv, str(out)]) == 2
    assert "exists and is not empty" in cli_error_line(capsys.readouterr().err)
    assert snapshot_files(out) == {"mine.txt": b"keep me"}
    assert main([*argv, str(out / "mine.txt")]) == 2
    assert "existing file" in cli_error_line(capsys.readouterr().err)
    assert (out / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- export
def _flip_a_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


HOSTILE_CHECKPOINT = [
    # (file in step-0000002, tamper, keep the checksums?, expected in the message)
    ("trainer_state.json", lambda f: f.write_text("{not json"), True, "malformed trainer state"),
    ("trainer_state.json", _set_json(step=-5), True, "'step' = -5 is implausible"),
    ("unet_lora/pytorch_lora_weights.safetensors", _flip_a_byte, True, "contents differ from the checksum"),
    ("unet_lora/pytorch_lora_weights.safetensors", lambda f: f.write_bytes(b"junk"), False, "not a valid safetensors"),
    ("unet_lora/adapter_config.json", _set_json(lora_alpha=-1), False, "lora_alpha"),
    ("vre/config.json", _set_json(ch=100000), False, "ch = 100000"),
    ("prompt_adapter/config.json", lambda f: f.write_text("[]"), False, "must be a JSON object"),
    ("config.yaml", lambda f: f.write_text(f.read_text().replace("rank: 8", "rank: 100000")), False,
     "model.lora.rank must be ≤ 1024"),
]


@pytest.mark.parametrize("name, tamper, keep_manifest, reason", HOSTILE_CHECKPOINT,
                         ids=[f"{n}-{r.split()[0]}" for n, _, _, r in HOSTILE_CHECKPOINT])
def test_export_of_a_hostile_named_checkpoint_is_one_line_and_leaves_nothing(tmp_path, gen_run, capsys, name,
                                                                             tamper, keep_manifest, reason):
    run = shutil.copytree(gen_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step-0000002"
    if not keep_manifest:  # a checkpoint of a version before checksums: the deeper checks must hold alone
        (ckpt / "manifest.json").unlink()
    tamper(ckpt / name)
    before = snapshot_files(run)
    out, official = tmp_path / "out" / "model", tmp_path / "official"
    assert main(["export", str(ckpt), "-o", str(out), "--official-layout", str(official)]) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert str(ckpt / name) in line and reason in line, line
    assert snapshot_files(run) == before
    assert not out.exists() and temporaries(out.parent) == [] and not official.exists()


def test_export_of_a_run_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, gen_run, capsys, caplog):
    run = shutil.copytree(gen_run, tmp_path / "run")
    (run / "checkpoints" / "step-0000002" / "trainer_state.json").unlink()  # an interrupted save
    before = snapshot_files(run)
    with caplog.at_level(logging.WARNING, logger="osdface"):
        assert main(["export", str(run), "--official-layout", str(tmp_path / "official")]) == 0
    assert f"exported {run / 'checkpoints' / 'step-0000001'}" in capsys.readouterr().out
    assert any("skipping checkpoint step-0000002" in r.getMessage() for r in caplog.records)
    assert snapshot_files(run) == before


def test_export_never_overwrites_release_files_and_writes_readable_files(tmp_path, gen_run, release, capsys):
    _, weights = copy_release(release, tmp_path / "release")
    before_release, before_run = snapshot_files(weights), snapshot_files(gen_run)
    out = tmp_path / "models" / "trained"
    # the release the run fine-tuned from is not an export target: refused before anything is written
    assert main(["export", str(gen_run), "-o", str(out), "--official-layout", str(weights)]) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert str(weights) in line and "already holds" in line and "associate_2.ckpt" in line
    assert snapshot_files(weights) == before_release and not out.exists() and temporaries(out.parent) == []
    # a killed export's leftover is cleaned; the new folder and files have plain permissions
    leave_killed_run(out)
    official = tmp_path / "official"
    assert main(["export", str(gen_run), "-o", str(out), "--official-layout", str(official)]) == 0
    assert temporaries(out.parent) == []
    assert (out / "model_index.json").is_file() and sorted(p.name for p in official.iterdir()) == sorted(OFFICIAL)
    assert_plain_permissions(out, *(official / n for n in OFFICIAL))
    assert snapshot_files(gen_run) == before_run
    # and the model folder is never replaced
    assert main(["export", str(gen_run), "-o", str(out)]) == 2
    assert "exists and is not empty" in cli_error_line(capsys.readouterr().err)
