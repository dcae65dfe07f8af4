"""Listing image files in dataset folders (no torch import, so worker processes start fast)."""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from ..utils.io import is_temp_name

__all__ = ["list_images"]


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files under ``root`` as sorted POSIX paths relative to ``root``.

    Hidden files and folders (names starting with ``.``) and osdface temporaries (partial atomic
    writes, also those a killed run left; :func:`~osdface.utils.io.is_temp_name`) are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    def keep(name: str) -> bool:
        return not name.startswith(".") and not is_temp_name(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS

    found: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root)
            found.extend((rel / f).as_posix() for f in filenames if keep(f))
    else:
        found = [p.name for p in root.iterdir() if keep(p.name) and p.is_file()]
    return sorted(found)
