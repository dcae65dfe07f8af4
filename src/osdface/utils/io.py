"""Small file helpers: atomic writes (never leave a half-written file behind), temporaries, JSON reading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .logging import get_logger

logger = get_logger(__name__)


#: Every temporary file or folder osdface writes starts with this (hidden, and never an image name:
#: input scanners skip it, :func:`clean_stale_temps` recognises it).
TEMP_PREFIX = ".osdface-tmp-"
#: Temporaries of versions before the prefix existed: ``.<stem>.<8 random>.tmp<.ext>`` (files).
_LEGACY_TEMP = re.compile(r"^\.[^/]*\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(?P<host>[^-]*)-(?P<pid>\d+)-[0-9a-f]{8}-")
_STALE_FOREIGN_SECONDS = 24 * 3600


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def _temp_name(final_name: str) -> str:
    # final_name last, so writers that infer the format from the suffix (PIL, OpenCV) still work
    return f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}-{final_name}"


def is_temp_name(name: str) -> bool:
    """True for the names osdface gives its temporaries (current and legacy)."""
    return name.startswith(TEMP_PREFIX) or bool(_LEGACY_TEMP.match(name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries left in ``folder`` by killed runs; return what was removed.

    A temporary is stale when the process that made it (host + PID in its name) is gone; one from
    another host is removed only after a day. Legacy hidden ``.*.tmp.*`` files count as stale.
    Temporaries of live runs (this one included) are left alone.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host, now = _host_tag(), time.time()
    for entry in folder.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if m:
            if m["host"] == host:
                stale = not _pid_alive(int(m["pid"]))
            else:
                stale = now - entry.lstat().st_mtime > _STALE_FOREIGN_SECONDS
        else:
            stale = bool(_LEGACY_TEMP.match(entry.name)) and entry.is_file()
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        logger.info("removed %s, left by an interrupted run", entry)
    return removed


def _plain_file_mode(folder: Path) -> int:
    """The mode ``open()`` gives a new file in ``folder`` (0666 minus the umask), found with a probe
    file: reading the umask with ``os.umask`` would change it process-wide for a moment."""
    probe = folder / f".osdface-tmp-umask-probe-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def normalize_permissions(folder: str | Path, paths: list[Path] | None = None) -> None:
    """Give files the mode of a plainly written file (0666 minus the umask) and folders that of a
    plain ``mkdir`` (0777 minus the umask): all of ``folder`` (itself included), or only ``paths`` in it.

    safetensors (0.5 and later) writes its files 0600 through a private temporary; a model folder,
    checkpoint or exported file should be as readable as any other file its owner writes.
    """
    folder = Path(folder)
    file_mode = _plain_file_mode(folder)
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r (0644 → 0755, 0600 → 0700)
    for p in [folder, *folder.rglob("*")] if paths is None else paths:
        if not p.is_symlink():
            p.chmod(dir_mode if p.is_dir() else file_mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary is named ``.osdface-tmp-<host>-<pid>-<random>-<name>`` (see :func:`is_temp_name`):
    it keeps ``path``'s suffix so writers that infer the format from the name still work. It is
    created with mode 0666 minus the umask, as a plain ``open()`` would (no process-wide umask
    change). On error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / _temp_name(path.name)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success rename it to ``path``.

    ``path`` must not exist or be an empty folder. The temporary is created with mode 0777 minus
    the umask (what ``mkdir`` gives), and everything written into it gets normal permissions
    (:func:`normalize_permissions`) before the rename; on error it is
    removed with everything in it, and a killed run's leftover is removed by :func:`clean_stale_temps`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / _temp_name(path.name)
    os.mkdir(tmp_path, 0o777)
    try:
        yield tmp_path
        normalize_permissions(tmp_path)  # writers such as safetensors create 0600 files
        if path.is_dir():
            path.rmdir()  # only an empty folder; anything else raises and keeps both
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises :class:`ModelFileError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read the {what} ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: malformed {what}: {e}") from None


def yaml_error_reason(e: Exception) -> str:
    """One line saying why PyYAML refused a document: the problem and where (its own text spans lines)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
