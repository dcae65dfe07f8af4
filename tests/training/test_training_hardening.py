"""Issue 12 for training: never lose a user's file, never fall over on a hostile one.

* config bounds: absurd sizes are a :class:`ConfigError` naming the field, value and bound (CLI: one
  line, exit 2), and the shipped configs stay valid;
"""

from __future__ import annotations

from pathlib import Path

import pytest

from osdface.cli import main
from osdface.training.config import BOUNDS, ConfigError
from osdface.training.generator import load_generator_config
from osdface.training.vre import load_vre_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VRE_TINY = CONFIGS / "vre-tiny.yaml"
GEN_TINY = CONFIGS / "generator-tiny.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes): inputs must come out byte-identical."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(err: str) -> str:
    """The CLI's error: exactly one ``osdface: error:`` line and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("osdface: error:")]
    assert len(lines) == 1, err
    return lines[0]


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
    before = snapshot(small_face_dir)
    argv = ["train", "vre", "--config", str(VRE_TINY), "--data", str(small_face_dir), "-o", str(run), "--cpu",
            "--set", "model.vqgan.ch=100000"]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "model.vqgan.ch" in line and "100000" in line and "1024" in line
    assert not run.exists() and snapshot(small_face_dir) == before
