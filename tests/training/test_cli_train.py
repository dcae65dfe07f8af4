"""``osdface train vre`` through ``osdface.cli.main``."""

from pathlib import Path

from osdface.cli import main
from osdface.training.checkpoint import latest_checkpoint, read_trainer_state

TINY = Path(__file__).resolve().parents[2] / "configs" / "vre-tiny.yaml"
FAST = ["train.batch_size=1", "loss.lpips=0", "train.val_every=0", "data.val_images=1"]


def test_train_vre_cli_phase_lq_then_resume(tmp_path, small_face_dir, capsys):
    run = tmp_path / "run"
    argv = ["train", "vre", "--config", str(TINY), "--data", str(small_face_dir), "-o", str(run),
            "--set", "phase=lq", *FAST]
    assert main([*argv, "--max-steps", "1", "--cpu"]) == 0
    ck = latest_checkpoint(run)
    assert ck.name == "step-0000001"
    assert {p.name for p in ck.iterdir()} >= {"vqgan_lq", "disc_lq"} and not (ck / "vqgan_hq").exists()
    assert (run / "export" / "vre" / "config.json").is_file() and (run / "export" / "associate_2.ckpt").is_file()
    assert "exported" in capsys.readouterr().out
    # an existing run is never overwritten silently; --resume continues it
    assert main([*argv, "--max-steps", "2", "--cpu"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--max-steps", "2", "--cpu", "--resume"]) == 0
    assert read_trainer_state(latest_checkpoint(run))["step"] == 2


def test_train_vre_cli_reports_config_errors(tmp_path, small_face_dir, capsys):
    argv = ["train", "vre", "--config", str(TINY), "--data", str(small_face_dir), "-o", str(tmp_path / "r")]
    assert main([*argv, "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "did you mean 'lr'" in err
    assert main([*argv, "--set", "train.batch_size=big"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["train", "vre", "--config", str(tmp_path / "none.yaml"), "--data", "x", "-o", "y"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_init_checkpoint_is_a_clear_error(tmp_path, small_face_dir, capsys):
    argv = ["train", "vre", "--config", str(TINY), "--data", str(small_face_dir), "-o", str(tmp_path / "r"),
            "--set", f"model.init_hq={tmp_path / 'no-such-run'}", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.init_hq" in err and "no-such-run" in err
