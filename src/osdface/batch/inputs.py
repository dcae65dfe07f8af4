"""Which photos a collection run restores, and where each result goes.

Issue 15 (restore whole photo collections). The rules, in one place for every engine:

* A folder given as an input is a *root*: it is scanned recursively (hidden files and folders and
  osdface temporaries skipped, the output folder's subtree excluded) and a photo at
  ``ROOT/a/b/x.jpg`` is written to ``OUT/a/b/x.<ext>``; same-name photos in different folders
  never collide.
* A file named directly keeps the flat name ``OUT/x.<ext>``.
* A glob's root is the part of the pattern before the first wildcard (``photos/**/*.jpg`` mirrors
  ``photos/``; ``dir/*.png`` gives ``OUT/<stem>`` as before).
* An input list (:func:`read_input_list`) holds one path per line, relative to the list's folder;
  its files mirror their path below that folder (elsewhere: the flat name), its folders are roots.
* :func:`select_shard` splits the sorted input list deterministically into ``N`` parts.

Kept free of torch and of the face layer: the CLI plans a run before anything heavy is imported.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..constants import IMAGE_EXTENSIONS
from ..errors import InvalidSettingError, OSDFaceError
from ..utils.io import is_temp_name

_MAGIC = "*?["


class InputListError(OSDFaceError, ValueError):
    """An ``--input-list`` file cannot be read (missing, unreadable)."""


@dataclass(frozen=True)
class InputPhoto:
    """One input file and the place of its result.

    Attributes:
        path: the file, as found (a folder root joined with the relative path, or as given).
        rel: its output location below the output folder, without suffix (``a/b/x``; ``x`` for a
            file given directly).
    """

    path: Path
    rel: PurePosixPath

    def output(self, out_dir: Path, ext: str, suffix: str = "") -> Path:
        """``out_dir/rel<suffix>.<ext>``; ``ext`` is ``"auto"`` to keep the input's own suffix."""
        if ext == "auto":
            ext = self.path.suffix.lower().lstrip(".") or "png"
        return out_dir.joinpath(*self.rel.parent.parts, f"{self.rel.name}{suffix}.{ext}")


def _scanned(p: Path, extensions: Sequence[str]) -> bool:
    return (not p.name.startswith(".") and not is_temp_name(p.name) and p.suffix.lower() in extensions
            and p.is_file())


def _is_under(p: Path, folders: Sequence[Path]) -> bool:
    return any(p == f or f in p.parents for f in folders)


def scan_folder(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, *, recursive: bool = True,
                exclude: Sequence[Path] = (), problems: list[str] | None = None) -> list[Path]:
    """Image files under ``root``, sorted by their path relative to ``root``.

    Hidden files and folders and osdface temporaries are skipped; folders in ``exclude`` (resolved
    paths, e.g. the output folder when it lies inside an input folder) are not entered; symlinked
    folders are not followed (no loops). A subfolder that cannot be read is a line in ``problems``
    naming it (never skipped silently).
    """
    if not recursive:
        return sorted(q for q in root.iterdir() if _scanned(q, extensions))

    def unreadable(e: OSError) -> None:
        if problems is not None:
            problems.append(f"{e.filename}: cannot read the folder ({e.strerror}); its photos are not restored")

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not _is_under((here / d).resolve(), exclude))
        found.extend(here / n for n in filenames if _scanned(here / n, extensions))
    return sorted(found, key=lambda q: q.relative_to(root).parts)


def _rel(path: Path, root: Path) -> PurePosixPath:
    """``path`` below ``root`` without suffix (``a/b/x``). Raises ValueError when it is not below it,
    ``..`` parts included (the output would leave the output folder)."""
    rel = path.relative_to(root)
    if ".." in rel.parts:
        raise ValueError(f"{path} is not below {root}")
    return PurePosixPath(*rel.with_suffix("").parts)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if any(ch in part for ch in _MAGIC):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def collect_inputs(items: Iterable[str | os.PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS, *,
                   recursive: bool = True, exclude: Sequence[str | os.PathLike] = (),
                   list_root: Path | None = None) -> tuple[list[InputPhoto], list[str]]:
    """Files, folders and globs → (photos in order, problems), duplicates (same resolved file) dropped.

    Args:
        items: command-line inputs (or the entries of an input list).
        extensions: suffixes a folder scan or glob accepts (a file named directly is taken as is).
        recursive: scan folders recursively and mirror their tree (``False``: the folder's own
            files only, flat names; what ``osdface align`` uses).
        exclude: folders never scanned into (the output folder).
        list_root: for the entries of an input list: files below it mirror their path below it.

    A missing path, an empty folder, a pattern matching nothing or an osdface temporary named
    directly is a problem (one line naming it); the others still count.
    """
    excluded = [Path(e).expanduser().resolve() for e in exclude]
    photos: list[InputPhoto] = []
    problems: list[str] = []
    for item in items:
        text = os.fspath(item)
        p = Path(text).expanduser()
        if p.is_dir():
            found = scan_folder(p, extensions, recursive=recursive, exclude=excluded, problems=problems)
            if not found:
                problems.append(f"{p}: folder contains no images ({', '.join(extensions)})")
            photos.extend(InputPhoto(q, _rel(q, p)) for q in found)
        elif p.is_file():
            if is_temp_name(p.name):
                problems.append(f"{p}: a temporary file left by an interrupted osdface run, not an input")
                continue
            rel = PurePosixPath(p.stem)
            if list_root is not None:
                try:
                    rel = _rel(p, list_root)
                except ValueError:  # outside the list's folder: the flat name
                    pass
            photos.append(InputPhoto(p, rel))
        elif list_root is None and any(ch in text for ch in _MAGIC):
            root = _glob_root(os.path.expanduser(text))
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)
                             if Path(m).is_file() and not is_temp_name(Path(m).name)
                             and Path(m).suffix.lower() in extensions
                             and not _is_under(Path(m).resolve(), excluded))
            if not matched:
                problems.append(f"{text}: pattern matches no images ({', '.join(extensions)})")
            for m in matched:
                try:
                    rel = _rel(m, root) if recursive else PurePosixPath(m.stem)
                except ValueError:
                    rel = PurePosixPath(m.stem)
                photos.append(InputPhoto(m, rel))
        else:
            problems.append(f"{p}: no such file or folder")
    return unique_photos(photos), problems


def unique_photos(photos: Iterable[InputPhoto]) -> list[InputPhoto]:
    """``photos`` without later entries naming a file already listed (by resolved path), order kept."""
    seen: set[Path] = set()
    unique = []
    for ph in photos:
        key = ph.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(ph)
    return unique


def read_input_list(source: str | os.PathLike) -> tuple[list[Path], Path]:
    """The entries of an input list and the folder they are relative to.

    ``source`` is a file with one path per line (names as the file system spells them, decoded like
    ``os.fsdecode``, so a name that is not UTF-8 is kept; a UTF-8 byte-order mark is dropped; blank
    lines skipped; line ends and trailing ``\\r`` stripped, nothing else, so names may contain spaces or
    ``#``), or ``"-"`` for standard input (read the same way; relative to the current folder). Relative
    entries are joined to the list's folder and every entry is normalised (``..`` resolved by name, as
    ``os.path.normpath``); no glob expansion (names may contain ``[``).

    Raises:
        InputListError: the list file is missing or unreadable (named).
    """
    if os.fspath(source) == "-":
        stdin_bytes = getattr(sys.stdin, "buffer", None)
        data = stdin_bytes.read() if stdin_bytes is not None else os.fsencode(sys.stdin.read())
        root = Path.cwd()
    else:
        path = Path(source).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputListError(f"{path}: --input-list file not found") from None
        except OSError as e:
            raise InputListError(f"{path}: cannot read the --input-list file ({e})") from None
        root = path.parent.resolve()
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is not part of the first name
    entries = []
    for raw in data.split(b"\n"):
        line = os.fsdecode(raw.rstrip(b"\r"))
        if line.strip():
            p = Path(line).expanduser()
            # normalised (``a/../b`` → ``b``), so ``../other/x.jpg`` is seen to lie outside the list's folder
            entries.append(Path(os.path.normpath(p if p.is_absolute() else root / p)))
    return entries, root


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1 ≤ K ≤ N) → ``(K, N)``.

    Raises:
        InvalidSettingError: naming ``--shard`` and the value.
    """
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InvalidSettingError(f"--shard {text!r}: expected K/N, e.g. 1/4") from None
    if not (n >= 1 and 1 <= k <= n):
        raise InvalidSettingError(f"--shard {text!r}: need 1 <= K <= N")
    return k, n


def shard_indices(paths: Sequence[Path], k: int, n: int) -> list[int]:
    """Indices (in input order) of shard ``k`` of ``n``: every ``n``-th photo of the list sorted by
    path (round-robin, so each shard gets a share of every folder). The same inputs give the same
    split in every process; the ``n`` shards cover each photo exactly once."""
    order = sorted(range(len(paths)), key=lambda i: (os.fspath(paths[i]), i))
    return sorted(order[k - 1::n])


def select_shard(photos: Sequence, k: int, n: int, key=lambda ph: ph.path) -> list:
    """The items of shard ``k``/``n`` of ``photos`` (see :func:`shard_indices`), in input order."""
    return [photos[i] for i in shard_indices([key(ph) for ph in photos], k, n)]
