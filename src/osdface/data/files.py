"""Listing image files in dataset folders (no torch import, so worker processes start fast)."""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS

__all__ = ["list_images"]


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files under ``root`` as sorted POSIX paths relative to ``root``.

    Hidden files and folders (names starting with ``.``, e.g. partial atomic writes) are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    found: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root)
            found.extend(
                (rel / f).as_posix() for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
    else:
        found = [p.name for p in root.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)
