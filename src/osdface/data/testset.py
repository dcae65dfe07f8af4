"""Build a CelebA-Test-style synthetic evaluation set from any folder of HQ faces.

:func:`degrade_folder` writes one LQ PNG per HQ image — same size, same file stem — plus a JSON
manifest of the parameters drawn for each image. Each image's seed is
``image_seed(seed, file name, epoch=0)``, the same identity :class:`~osdface.data.datasets.DegradedFaceDataset`
uses for a single root, so the set is independent of file order and of the number of worker
processes, and equals that dataset's epoch-0 draw without flips.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..errors import OutputPathError
from ..image import ImageError, read_image, save_image
from ..utils.io import clean_stale_temps, write_text_atomic
from ..utils.logging import get_logger
from .degradation import (
    PRESETS,
    DegradationConfig,
    DegradationSpec,
    Degrader,
    image_seed,
    resolve_degradation,
)
from .files import list_images

__all__ = ["MANIFEST_FORMAT", "FolderDegradationResult", "degrade_folder", "format_manifest", "lq_name"]

logger = get_logger(__name__)

#: ``format`` field of the manifest written by :func:`degrade_folder`.
MANIFEST_FORMAT = "osdface-degradation-manifest/1"


@dataclass
class FolderDegradationResult:
    """Outcome of :func:`degrade_folder`.

    Attributes:
        manifest: the manifest dict (``format``, ``preset``, ``seed``, ``config``, ``images``);
            ``images`` holds one record per written image, sorted by input name:
            ``{"input", "output", "seed", "height", "width", "params"}``.
        errors: one message per input that failed (each names the file).
        manifest_path: where the manifest was written, if anywhere.
    """

    manifest: dict[str, Any]
    errors: list[str] = field(default_factory=list)
    manifest_path: Path | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.manifest["images"]


# Pool workers only: the Degrader of this spawned worker process, built once by _init_pool_worker
# (ProcessPoolExecutor's initializer cannot hand state to the tasks any other way). The
# single-process path passes its Degrader explicitly and never touches it.
_POOL_DEGRADER: list[Degrader] = []


def _init_pool_worker(config: DegradationConfig) -> None:
    """Initializer of a freshly spawned pool worker: one thread for OpenCV (the processes provide
    the parallelism) and this process's Degrader."""
    import cv2

    cv2.setNumThreads(1)
    _POOL_DEGRADER[:] = [Degrader(config)]


def _pool_degrade_one(src: str, rel: str, dst: str, seed: int) -> tuple[str, dict[str, Any] | None, str | None]:
    """:func:`_degrade_one` with the pool worker's Degrader."""
    return _degrade_one(_POOL_DEGRADER[0], src, rel, dst, seed)


def _degrade_one(degrader: Degrader, src: str, rel: str, dst: str, seed: int
                 ) -> tuple[str, dict[str, Any] | None, str | None]:
    """Degrade ``src`` into ``dst``; returns (rel, manifest record or None, error or None)."""
    try:
        hq = read_image(src).rgb
        s = image_seed(seed, rel, 0)
        lq, params = degrader(hq, s)
        save_image(dst, lq)
    except ImageError as e:
        return rel, None, str(e)
    except OSError as e:
        return rel, None, f"{src}: cannot write {dst}: {e}"
    record = {"input": rel, "output": Path(dst).name, "seed": s, "height": int(hq.shape[0]),
              "width": int(hq.shape[1]), "params": params}
    return rel, record, None


def lq_name(rel: str) -> str:
    """File name of the LQ image :func:`degrade_folder` writes for the input ``rel``: ``<stem>.png``."""
    return f"{Path(rel).stem}.png"


def _entry(p: Path) -> Path:
    # the directory entry an atomic write to p replaces (a symlink at p itself is replaced, not followed)
    return p.parent.resolve() / p.name


def format_manifest(manifest: dict[str, Any]) -> str:
    """JSON text of a manifest with one image record per line (valid JSON, easy to grep and diff)."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in manifest.items() if k != "images"]
    body = ",\n".join(f"  {json.dumps(r)}" for r in manifest["images"])
    return "{\n" + "\n".join(head) + '\n "images": [\n' + body + ("\n" if body else "") + " ]\n}\n"


def degrade_folder(
    hq_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    degradation: DegradationSpec = "daefr",
    seed: int = 0,
    workers: int = 1,
    manifest_path: str | os.PathLike | None = None,
    progress: bool = False,
    on_error: Callable[[str], None] | None = None,
) -> FolderDegradationResult:
    """Write a degraded copy of every image in ``hq_dir`` (non-recursive) into ``out_dir``.

    Args:
        hq_dir: folder of HQ images (any size; RGB, gray, RGBA… are read as RGB).
        out_dir: output folder; ``<stem>.png`` per input, the same size as its input, written
            atomically. It may not be ``hq_dir`` itself (inputs are never modified). Temporaries
            that killed runs left there are removed first.
        degradation: preset name, YAML path, mapping (optionally with ``preset: NAME``) or
            :class:`~osdface.data.degradation.DegradationConfig`.
        seed: global non-negative seed.
        workers: processes to use (1 = in this process).
        manifest_path: where to write the JSON manifest (``None``: not written); never an input
            image or one of the LQ images (an existing other file is replaced).
        progress: show a tqdm progress bar.
        on_error: called with each error message as it happens (the CLI prints them).

    Returns:
        A :class:`FolderDegradationResult`; unreadable inputs and name clashes are listed in
        ``errors`` and skipped, the other images are still written.

    Raises:
        FileNotFoundError: ``hq_dir`` is not a folder.
        ValueError: bad arguments.
        OutputPathError: ``out_dir`` is ``hq_dir``, or ``manifest_path`` is an input or an LQ image
            (a ``ValueError`` too); raised before anything is written.
    """
    hq_dir, out_dir = Path(hq_dir), Path(out_dir)
    config = resolve_degradation(degradation)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    names = list_images(hq_dir, recursive=False)
    if out_dir.exists() and out_dir.resolve() == hq_dir.resolve():
        raise OutputPathError(f"{out_dir}: the output folder is the input folder; choose another one")
    if manifest_path is not None:
        m = _entry(Path(manifest_path))
        if any(m in (_entry(hq_dir / rel), (hq_dir / rel).resolve()) for rel in names):
            raise OutputPathError(f"{manifest_path}: the manifest would overwrite an input image; choose another path")
        if any(m == _entry(out_dir / lq_name(rel)) for rel in names):
            raise OutputPathError(f"{manifest_path}: the manifest would overwrite an LQ output; choose another path")
    preset = next((n for n, c in PRESETS.items() if c == config), None)
    errors: list[str] = []

    def fail(msg: str) -> None:
        errors.append(msg)
        logger.debug(msg)
        if on_error is not None:
            on_error(msg)

    # plan: one output per stem
    jobs: list[tuple[str, str, str, int]] = []
    taken: dict[str, str] = {}
    for rel in names:
        out_name = lq_name(rel)
        if out_name in taken:
            fail(f"{hq_dir / rel}: output name {out_name} already used by {taken[out_name]}; rename one input")
            continue
        taken[out_name] = rel
        jobs.append((str(hq_dir / rel), rel, str(out_dir / out_name), seed))
    if not names:
        fail(f"{hq_dir}: folder contains no images")

    clean_stale_temps(out_dir)
    records: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="degrade", unit="img", disable=None)

    def collect(rel: str, record: dict[str, Any] | None, error: str | None) -> None:
        if error is not None:
            fail(error)
        else:
            records[rel] = record
        if bar is not None:
            bar.update(1)

    try:
        if workers == 1 or len(jobs) <= 1:
            degrader = Degrader(config)
            for job in jobs:
                collect(*_degrade_one(degrader, *job))
        else:
            # spawn: safe with OpenCV/torch threads in the parent (fork can deadlock them)
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                                     initializer=_init_pool_worker, initargs=(config,)) as pool:
                futures = [pool.submit(_pool_degrade_one, *job) for job in jobs]
                for fut in as_completed(futures):
                    collect(*fut.result())
    finally:
        if bar is not None:
            bar.close()

    manifest = {
        "format": MANIFEST_FORMAT,
        "preset": preset,
        "seed": seed,
        "config": config.to_dict(),
        "images": [records[r] for r in sorted(records)],
    }
    written = None
    if manifest_path is not None:
        written = Path(manifest_path)
        write_text_atomic(written, format_manifest(manifest))
    logger.debug("degraded %d of %d images from %s into %s", len(records), len(names), hq_dir, out_dir)
    return FolderDegradationResult(manifest=manifest, errors=errors, manifest_path=written)
