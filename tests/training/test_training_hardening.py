"""Issue 12 for training: never lose a user's file, never fall over on a hostile one.

* config bounds: absurd sizes are a :class:`ConfigError` naming the field, value and bound (CLI: one
  line, exit 2), and the shipped configs stay valid;
* undecodable training images are skipped, named in a warning, counted in the log, and replaced
  deterministically (a resumed run equals an uninterrupted one); all undecodable is one clear error;
* resume validates the newest checkpoint (files, checksums, trainer_state.json, plausible step) and
  falls back to the newest intact one, still equal to the uninterrupted run; a named bad checkpoint,
  an absurd trainer state or a tampered accelerate state is one line naming the file, exit 2;
* ``train generator`` with a hostile VRE, base model or resume state: one line, exit 2.

Every failing case checks the exit code, the one-line message naming the file and that the inputs
(data folders, run folders, model files) are byte-identical afterwards. Tiny configs, 1-2 steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import pytest
import torch
from safetensors.torch import load_file

from osdface.cli import main
from osdface.errors import ModelFileError
from osdface.testing import cli_error_line, snapshot_files
from osdface.training.checkpoint import MANIFEST, latest_checkpoint, list_checkpoints, validate_checkpoint
from osdface.training.config import BOUNDS, ConfigError
from osdface.training.generator_config import load_generator_config
from osdface.training.vre import load_vre_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VRE_TINY = CONFIGS / "vre-tiny.yaml"
GEN_TINY = CONFIGS / "generator-tiny.yaml"


# ---------------------------------------------------------------------------------- config bounds
def test_shipped_configs_are_inside_the_bounds():
    for name in ("vre-paper", "vre-tiny"):
        load_vre_config(CONFIGS / f"{name}.yaml")
    for name in ("generator-paper", "generator-tiny"):
        load_generator_config(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("loader, override, field, bound", [
    (load_vre_config, "model.vqgan.ch=100000", "model.vqgan.ch", "≤ 1024"),
    (load_vre_config, "model.vqgan.ch_mult=[1, 2, 4096]", "model.vqgan.ch_mult[2]", "≤ 32"),
    (load_vre_config, "model.vqgan.ch_mult=[1, 2, 32]", "model.vqgan.ch × max(ch_mult)", "≤ 8192"),
    (load_vre_config, "model.vqgan.n_embed=10000000", "model.vqgan.n_embed", "≤ 65536"),
    (load_vre_config, "train.batch_size=1000000", "train.batch_size", "≤ 1024"),
    (load_vre_config, "data.size=1000000", "data.size", "≤ 4096"),
    (load_vre_config, "loss.gan=-1", "loss.gan", "≥ 0"),
    (load_vre_config, "optim.betas=[0.5, 3]", "optim.betas[1]", "≤ 1"),
    (load_vre_config, "train.seed=-5", "train.seed", "≥ 0"),
    (load_generator_config, "model.lora.rank=100000", "model.lora.rank", "≤ 1024"),
    (load_generator_config, "model.discriminator.head_channels=10000000", "model.discriminator.head_channels",
     "≤ 16384"),
    (load_generator_config, "model.timestep=5000", "model.timestep", "≤ 999"),
    (load_generator_config, "optim.eps=0", "optim.eps", "> 0"),
])
def test_absurd_sizes_are_config_errors_naming_field_value_and_bound(loader, override, field, bound):
    tiny = VRE_TINY if loader is load_vre_config else GEN_TINY
    with pytest.raises(ConfigError) as info:
        loader(tiny, [override, "model.vqgan.ch=512"] if "ch_mult" in field else [override])
    msg = str(info.value)
    assert msg.startswith(field) and bound in msg and "BOUNDS" in msg, msg
    assert field.split("[")[0] in BOUNDS or field in BOUNDS


def test_non_finite_and_inconsistent_values_are_refused():
    with pytest.raises(ConfigError, match="optim.lr: expected a finite number"):
        load_vre_config(VRE_TINY, ["optim.lr=.nan"])
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got 1000000000\d*\.\.\.$"):
        load_vre_config(VRE_TINY, [f"optim.lr={10**400}"])
    with pytest.raises(ConfigError, match=rf"train.max_steps must be ≤ 1000000000, got {10**30} "):
        load_vre_config(VRE_TINY, [f"train.max_steps={10**30}"])
    with pytest.raises(ConfigError, match=r"t_min \(600\) must be ≤ t_max \(100\)"):
        load_generator_config(GEN_TINY, ["model.discriminator.t_min=600", "model.discriminator.t_max=100"])


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vqgan:\n    ch: 100000\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: model.vqgan.ch must be ≤ 1024, got 100000"):
        load_vre_config(bad, ["train.max_steps=2"])
    # the same field given by --set: the message names the field, not the file
    with pytest.raises(ConfigError, match=r"^model.vqgan.ch must be ≤ 1024, got 200000"):
        load_vre_config(bad, ["model.vqgan.ch=200000"])


def test_cli_reports_an_absurd_size_in_one_line(tmp_path, small_face_dir, capsys):
    run = tmp_path / "run"
    before = snapshot_files(small_face_dir)
    argv = ["train", "vre", "--config", str(VRE_TINY), "--data", str(small_face_dir), "-o", str(run), "--cpu",
            "--set", "model.vqgan.ch=100000"]
    assert main(argv) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert "model.vqgan.ch" in line and "100000" in line and "1024" in line
    assert not run.exists() and snapshot_files(small_face_dir) == before


# ------------------------------------------------------------------------------------ stage-1 runs
#: phase hq without GAN or LPIPS: the cheapest real training step (one tiny VQ-GAN)
VRE_FAST = ["phase=hq", "loss.gan=0", "loss.lpips=0", "train.val_every=0", "data.val_images=1",
            "train.ckpt_every=1", "train.keep_last=0", "train.log_every=1"]


def vre_argv(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "vre", "--config", str(VRE_TINY), "--data", str(data), "-o", str(run), "--cpu",
            "--max-steps", str(steps), *extra, "--set", *VRE_FAST]


def ckpt_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (components, extra tensors, the accelerate model state)."""
    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        out.update({f"{f.relative_to(ckpt)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vre_run(tmp_path_factory, small_face_dir):
    """A finished 2-step stage-1 run with a checkpoint per step (read-only: copy before tampering)."""
    run = tmp_path_factory.mktemp("vre") / "run"
    assert main(vre_argv(small_face_dir, run, 2)) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-0000001", "step-0000002"]
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.fixture
def faces_with_bad(tmp_path, face_crops):
    """Two real faces and two undecodable files (garbage bytes, a truncated JPEG)."""
    d = tmp_path / "faces"
    d.mkdir()
    for i in (0, 2):
        cv2.imwrite(str(d / f"face{i}.png"), face_crops[i][:, :, ::-1])
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ok, jpg = cv2.imencode(".jpg", face_crops[3])
    (d / "cut.jpg").write_bytes(jpg.tobytes()[:200])
    return d


def test_undecodable_images_are_skipped_counted_and_resume_still_equals_the_full_run(tmp_path, faces_with_bad,
                                                                                     caplog, capsys):
    before = snapshot_files(faces_with_bad)
    # 4 files, batch 2: epoch 0 draws every file, so both undecodable ones are met (and replaced)
    full, split = tmp_path / "full", tmp_path / "split"
    with caplog.at_level(logging.WARNING, logger="osdface"):
        assert main(vre_argv(faces_with_bad, full, 2, "--set", "train.batch_size=2")) == 0
    warned = " ".join(r.getMessage() for r in caplog.records if "undecodable" in r.getMessage())
    assert "broken.png" in warned and "cut.jpg" in warned
    assert "skipped 2 undecodable training image(s)" in capsys.readouterr().out
    log = [r for r in read_log(full) if "train/g_total" in r]
    assert [r["data/undecodable_images"] for r in log][-1] == 2
    # stop after step 1, resume: the replacements are the same, so the end state is identical
    assert main(vre_argv(faces_with_bad, split, 1, "--set", "train.batch_size=2")) == 0
    assert main(vre_argv(faces_with_bad, split, 2, "--resume", "--set", "train.batch_size=2")) == 0
    a, b = ckpt_tensors(latest_checkpoint(full)), ckpt_tensors(latest_checkpoint(split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = ckpt_tensors(list_checkpoints(full)[0])
    assert any(not torch.equal(one[k], a[k]) for k in a)  # step 2 really trained: the comparison is not vacuous
    assert snapshot_files(faces_with_bad) == before


def test_a_folder_of_only_undecodable_images_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    for name in ("a.png", "b.jpg"):
        (data / name).write_bytes(b"garbage")
    before = snapshot_files(data)
    assert main(vre_argv(data, tmp_path / "run", 1, "--set", "train.batch_size=1")) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert "none of the 2 training images" in line and str(data) in line
    assert snapshot_files(data) == before


def test_resume_falls_back_from_a_corrupt_latest_checkpoint_and_equals_the_uninterrupted_run(
        tmp_path, vre_run, small_face_dir, caplog):
    run = copy_run(vre_run, tmp_path / "run")
    latest = run / "checkpoints" / "step-0000002"
    expected = ckpt_tensors(latest)
    (latest / "trainer_state.json").write_text('{"step": 2, "epoch": ')  # a torn write
    killed_save = run / "checkpoints" / ".tmp-step-0000007"  # what a save killed midway leaves
    (killed_save / "accelerate_state").mkdir(parents=True)
    (killed_save / "accelerate_state" / "optimizer.bin").write_bytes(b"half")
    older = snapshot_files(run / "checkpoints" / "step-0000001")
    with caplog.at_level(logging.WARNING, logger="osdface"):
        assert main(vre_argv(small_face_dir, run, 2, "--resume")) == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any("skipping checkpoint step-0000002" in m and "trainer_state.json" in m for m in msgs), msgs
    assert any("falling back to step-0000001" in m for m in msgs), msgs
    # step 2 was trained again from step 1: the same tensors as the uninterrupted run
    got = ckpt_tensors(latest)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    validate_checkpoint(latest)
    assert snapshot_files(run / "checkpoints" / "step-0000001") == older
    assert not killed_save.exists()


@pytest.mark.parametrize("edit, field", [
    (lambda s: {**s, "step": -5}, "'step' = -5 is implausible"),
    (lambda s: {**s, "step": 10**30}, f"'step' = {10**30} is implausible"),
    (lambda s: {**s, "step": "2"}, "'step' must be an integer"),
    (lambda s: {**s, "step": 1}, "does not match the folder name step-0000002"),
    (lambda s: {k: v for k, v in s.items() if k != "epoch"}, "'epoch' must be an integer, got missing"),
    (lambda s: [s], "must be a JSON object"),
])
def test_absurd_trainer_states_are_refused_naming_file_and_field(tmp_path, vre_run, edit, field):
    ckpt = shutil.copytree(vre_run / "checkpoints" / "step-0000002", tmp_path / "checkpoints" / "step-0000002")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(edit(state)))
    with pytest.raises(ModelFileError, match="trainer_state.json") as info:
        validate_checkpoint(ckpt)
    assert field in str(info.value)


def test_a_step_beyond_the_recorded_max_steps_is_refused(tmp_path, vre_run):
    ckpt = shutil.copytree(vre_run / "checkpoints" / "step-0000002", tmp_path / "checkpoints" / "step-0000500")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "step": 500}))
    with pytest.raises(ModelFileError, match=r"'step' = 500 is beyond the run's train.max_steps = 2"):
        validate_checkpoint(ckpt)


def test_resume_with_no_usable_checkpoint_is_one_line_and_leaves_the_run_untouched(tmp_path, vre_run,
                                                                                  small_face_dir, capsys):
    run = copy_run(vre_run, tmp_path / "run")
    for ckpt in list_checkpoints(run):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "step": -5}))
    before = snapshot_files(run)
    assert main(vre_argv(small_face_dir, run, 3, "--resume")) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert "no usable checkpoint" in line and "step-0000002/trainer_state.json" in line and "-5" in line
    assert snapshot_files(run) == before


def _garbage(f: Path) -> None:
    f.write_bytes(b"hello")


def _unsafe_pickle(f: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": Evil()}, f)


@pytest.mark.parametrize("tamper, reason", [(_garbage, "malformed pickle"), (_unsafe_pickle, "GLOBAL posix.system")])
def test_tampered_accelerate_state_is_one_line_naming_the_file(tmp_path, vre_run, small_face_dir, capsys,
                                                               tamper, reason):
    """A checkpoint written before checksums existed (no manifest): torch's errors become one line."""
    run = copy_run(vre_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-0000001")
    ckpt = run / "checkpoints" / "step-0000002"
    (ckpt / MANIFEST).unlink()
    tamper(ckpt / "accelerate_state" / "optimizer.bin")
    before = snapshot_files(run)
    assert main(vre_argv(small_face_dir, run, 3, "--resume")) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert "accelerate_state/optimizer.bin: cannot read the training state" in line and reason in line, line
    assert snapshot_files(run) == before


def test_checksums_catch_a_modified_state_file(tmp_path, vre_run, small_face_dir, capsys):
    run = copy_run(vre_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-0000001")
    f = run / "checkpoints" / "step-0000002" / "accelerate_state" / "optimizer.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit inside a tensor: torch would load it silently
    f.write_bytes(bytes(data))
    before = snapshot_files(run)
    assert main(vre_argv(small_face_dir, run, 3, "--resume")) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert "optimizer.bin: contents differ from the checksum" in line
    assert snapshot_files(run) == before


def test_an_explicitly_named_corrupt_checkpoint_is_an_error(tmp_path, vre_run, small_face_dir, capsys):
    run = copy_run(vre_run, tmp_path / "hq")
    named = run / "checkpoints" / "step-0000002"
    (named / "trainer_state.json").write_text("{not json")
    before = snapshot_files(run)
    argv = ["train", "vre", "--config", str(VRE_TINY), "--data", str(small_face_dir), "-o", str(tmp_path / "assoc"),
            "--cpu", "--max-steps", "1", "--set", "phase=assoc", f"model.init_hq={named}", "loss.lpips=0",
            "train.val_every=0", "data.val_images=1", "train.batch_size=1"]
    assert main(argv) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert f"{named / 'trainer_state.json'}: malformed trainer state" in line
    assert snapshot_files(run) == before
    # the run folder (not a named checkpoint) falls back to step 1
    assert latest_checkpoint(run) == run / "checkpoints" / "step-0000001"


def test_checkpoint_files_are_readable_like_any_file(vre_run):
    umask = os.umask(0o022)
    os.umask(umask)
    ckpt = vre_run / "checkpoints" / "step-0000002"
    for p in [ckpt, *ckpt.rglob("*")]:  # safetensors alone would write 0600
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p


# ------------------------------------------------------------------------------------ stage-2 runs
GEN_FAST = ["loss.ea_dists=0", "loss.identity=0", "data.val_images=0", "train.val_every=0", "train.batch_size=1",
            "train.ckpt_every=1", "train.keep_last=0"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny official release layout: (SD base folder, OSDFace weights folder)."""
    from osdface.testing import write_official_layout

    return write_official_layout(tmp_path_factory.mktemp("release"), seed=0)


def gen_argv(data: Path, run: Path, base: Path, steps: int, *model: str, resume: bool = False) -> list[str]:
    return ["train", "generator", "--config", str(GEN_TINY), "--data", str(data), "-o", str(run), "--cpu",
            "--base-model", str(base), *model, "--max-steps", str(steps), *(["--resume"] if resume else []),
            "--set", *GEN_FAST]


def _unsafe_ckpt(f: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {"vqvae_LQ.x": torch.zeros(1)}, "payload": Evil()}, f)


@pytest.mark.parametrize("which, tamper, reason", [
    ("vre", _unsafe_ckpt, "refusing to load"),
    ("vre", lambda f: f.write_bytes(f.read_bytes()[:4000]), "associate_2.ckpt"),
    ("adapter", _garbage, "embedding_change_weights.pth"),
    ("lora", lambda f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"), "not a valid safetensors"),
    ("unet_json", lambda f: f.write_text("{not json"), "malformed UNet config"),
    ("unet_json", lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "block_out_channels": [10**6, 10**6]})),
     "block_out_channels"),
])
def test_train_generator_hostile_model_files_are_one_line(tmp_path, release, small_face_dir, capsys,
                                                          which, tamper, reason):
    root = tmp_path / "release"
    shutil.copytree(release[0].parent, root)
    base, weights = root / release[0].name, root / release[1].name
    target = {"vre": weights / "associate_2.ckpt", "adapter": weights / "embedding_change_weights.pth",
              "lora": weights / "pytorch_lora_weights.safetensors", "unet_json": base / "unet" / "config.json"}[which]
    tamper(target)
    before = snapshot_files(root), snapshot_files(small_face_dir)
    run = tmp_path / "run"
    assert main(gen_argv(small_face_dir, run, base, 1, "--weights", str(weights))) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert str(target) in line and reason in line, line
    assert (snapshot_files(root), snapshot_files(small_face_dir)) == before
    assert not (run / "checkpoints").exists()


def test_train_generator_resume_with_a_tampered_optimizer_state_is_one_line(tmp_path, release, small_face_dir,
                                                                            capsys):
    base, weights = release
    run = tmp_path / "run"
    assert main(gen_argv(small_face_dir, run, base, 1, "--weights", str(weights))) == 0
    ckpt = run / "checkpoints" / "step-0000001"
    _garbage(ckpt / "accelerate_state" / "optimizer.bin")
    before = snapshot_files(run)
    # with the checksums: the checkpoint is not intact, and there is no older one
    assert main(gen_argv(small_face_dir, run, base, 2, "--weights", str(weights), resume=True)) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert "no usable checkpoint" in line and "accelerate_state/optimizer.bin" in line
    assert snapshot_files(run) == before
    # without them (a checkpoint of an older version): torch's error on reading, named
    (ckpt / MANIFEST).unlink()
    before = snapshot_files(run)
    assert main(gen_argv(small_face_dir, run, base, 2, "--weights", str(weights), resume=True)) == 2
    line = cli_error_line(capsys.readouterr().err)
    assert f"{ckpt / 'accelerate_state' / 'optimizer.bin'}: cannot read the training state" in line, line
    assert snapshot_files(run) == before


def test_bad_run_and_data_folders_are_one_line(tmp_path, small_face_dir, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    assert main(vre_argv(small_face_dir, afile, 1)) == 2
    assert f"{afile}: -o names an existing file" in cli_error_line(capsys.readouterr().err)
    assert afile.read_text() == "mine"
    assert main(vre_argv(tmp_path / "no-such-faces", tmp_path / "run", 1)) == 2
    assert f"{tmp_path / 'no-such-faces'}: no such folder" in cli_error_line(capsys.readouterr().err)
    bad_preset = ["--set", "data.degradation=strong"]
    assert main(vre_argv(small_face_dir, tmp_path / "run", 1, *bad_preset)) == 2
    assert "unknown degradation preset 'strong'" in cli_error_line(capsys.readouterr().err)
