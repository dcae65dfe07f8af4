"""The three stages of restoring one photo of a collection, shared by every engine.

Issue 15. Each engine (one process with overlapping threads, :mod:`osdface.batch.local`; Ray Data,
:mod:`osdface.batch.ray_engine`) runs exactly these functions, so their outputs are the same bytes:

1. :func:`prepare` — read the file, detect and align (:meth:`FaceRestorer.prepare`); CPU.
2. :func:`restore_faces` — the model on the aligned crops of one or many photos
   (:meth:`FaceRestorer.restore_crops`). Every model call runs a *full* batch of
   ``restorer.batch_size`` crops (the last one padded with copies of its last crop): a batch's
   numbers can depend on its size (a different kernel blocking), but not on which crops share it,
   so a photo's result does not depend on which photos it was batched with — single process,
   shards and Ray workers agree bit for bit (same device, precision, thread count, batch size).
3. :func:`write_photo` — paste back (:meth:`FaceRestorer.finish`) and write the output and the
   side outputs atomically; returns the report row (:mod:`osdface.batch.report`).

A failure of one photo is returned as a row with the reason (:func:`failure_row`); callers keep going.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import first_line
from ..image import ImageError, read_image, save_image
from ..utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class PhotoJob:
    """One photo of a run: the input file and its output file."""

    input: Path
    output: Path


@dataclass(frozen=True)
class WriteOptions:
    """Side outputs besides the restored photo.

    Attributes:
        compare: also write ``<output folder>/compare/<stem>.<ext>`` (input | output side by side).
        save_faces: also write ``cropped_faces/``, ``restored_faces/`` and ``cmp/`` per face
            (always done when the restorer does not paste back).
    """

    compare: bool = False
    save_faces: bool = False


def error_message(job: PhotoJob, exc: BaseException) -> str:
    """One line naming the input: an :class:`~osdface.image.ImageError` names its file already."""
    if isinstance(exc, ImageError) and str(job.input) in str(exc):
        return first_line(exc)
    return f"{job.input}: restoration failed: {first_line(exc)}"


def failure_row(job: PhotoJob, message: str) -> dict[str, Any]:
    """The report row of a photo that failed."""
    return {"input": str(job.input), "output": None, "faces": [], "error": message}


def prepare(restorer, job: PhotoJob):
    """Read ``job.input`` and detect + align its faces → :class:`~osdface.face.restorer.PreparedPhoto`.

    Raises:
        ImageError: the file is unreadable, truncated, not an image or too large (named).
    """
    return restorer.prepare(read_image(job.input))


def prepare_or_error(restorer, job: PhotoJob):
    """:func:`prepare`, or the exception that stopped it (recorded per photo; the run goes on)."""
    try:
        return prepare(restorer, job)
    except Exception as exc:  # noqa: BLE001 - recorded per photo with its reason; the run goes on
        logger.debug("preparing %s failed", job.input, exc_info=True)
        return exc


def restore_faces(restorer, crops: list[np.ndarray]) -> list[np.ndarray]:
    """Restored crops for ``crops`` (any number), run in full batches of ``restorer.batch_size``."""
    if not crops:
        return []
    bs = restorer.batch_size
    pad = (-len(crops)) % bs
    out = restorer.restore_crops(np.stack(list(crops) + [crops[-1]] * pad))
    return list(out[: len(crops)])


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a | b`` (``a`` resized to ``b``'s size when they differ)."""
    import cv2

    if a.shape[:2] != b.shape[:2]:
        a = cv2.resize(a, (b.shape[1], b.shape[0]), interpolation=cv2.INTER_LANCZOS4)
    return np.concatenate([a, b], axis=1)


def save_faces(result, out: Path, ext: str) -> None:
    """Per-face side outputs next to ``out``: ``cropped_faces/``, ``restored_faces/``, ``cmp/`` (``<stem>_NN``)."""
    root, stem = out.parent, out.stem
    for i, f in enumerate(result.faces):
        save_image(root / "cropped_faces" / f"{stem}_{i:02d}.{ext}", f.lq)
        if f.restored is not None:
            save_image(root / "restored_faces" / f"{stem}_{i:02d}.{ext}", f.restored)
            save_image(root / "cmp" / f"{stem}_{i:02d}.{ext}", side_by_side(f.lq, f.restored))


def write_photo(restorer, job: PhotoJob, prepared, restored: list[np.ndarray],
                options: WriteOptions = WriteOptions()) -> dict[str, Any]:
    """Paste ``restored`` (one crop per face of ``prepared``) back and write the outputs; → report row.

    Raises:
        OSError, ImageError: an output cannot be written (nothing half-written: writes are atomic).
    """
    res = restorer.finish(prepared, restored)
    row: dict[str, Any] = {"input": str(job.input), "output": None,
                           "faces": [f.to_json() for f in res.faces], "error": None}
    ext = job.output.suffix.lstrip(".")
    if res.image is not None:
        save_image(job.output, res.image, res.alpha)
        row["output"] = str(job.output)
        if options.compare:
            save_image(job.output.parent / "compare" / f"{job.output.stem}.{ext}",
                       side_by_side(prepared.rgb, res.image))
    if options.save_faces or not restorer.paste_back:
        save_faces(res, job.output, ext)
    return row


def write_or_failure_row(restorer, job: PhotoJob, prepared, restored: list[np.ndarray],
                         options: WriteOptions = WriteOptions(), error: str | None = None) -> dict[str, Any]:
    """:func:`write_photo`'s row; the failure row of ``error`` (an earlier stage failed), or of
    ``cannot write …`` when writing fails (recorded per photo; the run goes on)."""
    if error is not None:
        return failure_row(job, error)
    try:
        return write_photo(restorer, job, prepared, restored, options)
    except Exception as exc:  # noqa: BLE001 - recorded per photo with its reason; the run goes on
        logger.debug("writing %s failed", job.output, exc_info=True)
        return failure_row(job, f"{job.input}: cannot write {job.output}: {first_line(exc)}")
