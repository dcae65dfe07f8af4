import os
import stat

import pytest

from osdface.utils.io import atomic_path, write_text_atomic


def test_atomic_write_permissions_and_cleanup(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "hi")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hi"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    (tmp_path / "b.txt").write_text("original")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert (tmp_path / "b.txt").read_text() == "original"  # untouched on failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temp files left


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_temporaries_are_marked_and_stale_ones_cleaned(tmp_path):
    from osdface.utils.io import TEMP_PREFIX, _host_tag, clean_stale_temps, is_temp_name

    with atomic_path(tmp_path / "x.png") as tmp:
        assert tmp.name.startswith(TEMP_PREFIX) and tmp.name.endswith("x.png") and is_temp_name(tmp.name)
        assert clean_stale_temps(tmp_path) == []  # a live run's temporary is never touched
        assert tmp.exists()
    dead = f"{TEMP_PREFIX}{_host_tag()}-{_dead_pid()}-0123abcd-y.png"
    (tmp_path / dead).write_bytes(b"half")
    (tmp_path / (dead.replace("y.png", "model"))).mkdir()
    (tmp_path / (dead.replace("y.png", "model")) / "f").write_bytes(b"half")
    (tmp_path / ".y.ab12_XYZ.tmp.png").write_bytes(b"legacy")  # before the prefix existed
    (tmp_path / ".hidden.png").write_bytes(b"user file")  # not ours: kept
    removed = clean_stale_temps(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.png", "x.png"]


def test_atomic_dir_normal_permissions_and_cleanup(tmp_path):
    from osdface.utils.io import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "a.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "other") as tmp:
        (tmp / "a.json").write_text("{}")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
