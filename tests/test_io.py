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
