"""Restore a collection in one process, the file work overlapping the model.

Issue 15: on a GPU the CPU face work of a photo (decode, detect, align; paste, encode, write) takes
about as long as the model, so run sequentially the model waits half the time. Here three threads
run the stages of :mod:`osdface.batch.stages`:

    reader (read, detect, align) ─▶ queue(prefetch) ─▶ model (this thread) ─▶ queue(prefetch) ─▶ writer

Both queues are bounded (at most ``prefetch`` photos wait on each side) and so is the model stage
(at most ``max(prefetch, batch_size) + 1`` photos wait on a face batch), so memory stays bounded
and a slow writer holds the reader back. The model batches faces across photos in full batches
(:func:`~osdface.batch.stages.restore_faces`), and photos are written and reported in input order:
the outputs are the same bytes as with ``prefetch=0`` (no threads). OpenCV, PIL, numpy and torch
release the GIL in their heavy loops, so the threads overlap for real.

:class:`RunStats` says how long the model stage ran and how long it waited on file work.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..face.batching import PhotoFaceQueue
from ..utils.logging import get_logger
from .stages import (
    PhotoJob,
    WriteOptions,
    error_message,
    prepare_or_error,
    restore_faces,
    write_or_failure_row,
)

logger = get_logger(__name__)

_END = object()


@dataclass
class RunStats:
    """Counts and times of one run (seconds, ``time.perf_counter``).

    Attributes:
        photos: rows reported; failed: of those, the failed ones; faces: faces restored.
        wall_s: the whole run.
        model_s: time inside the model calls.
        model_wait_s: time the model stage waited for file work (an empty input queue or a full
            output queue; without overlap: all the read/detect/align and paste/write time).
    """

    photos: int = 0
    failed: int = 0
    faces: int = 0
    wall_s: float = 0.0
    model_s: float = 0.0
    model_wait_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _ModelStage:
    """Collects prepared photos, runs full face batches, hands finished photos on in input order.

    At most ``max(prefetch, batch_size) + 1`` photos wait here: past that, the faces pending are run
    before a full batch is there (:class:`~osdface.face.batching.PhotoFaceQueue`; the call is still
    padded to a full batch, so the bytes do not change).
    """

    def __init__(self, restorer, emit: Callable[[tuple], None], stats: RunStats, hold: int = 0) -> None:
        self.restorer, self.emit, self.stats = restorer, emit, stats
        self.batcher = PhotoFaceQueue(restorer.batch_size, self._restore, hold=hold)

    def add(self, job: PhotoJob, item) -> None:
        self._emit(self.batcher.add(job, item))

    def finish(self) -> None:
        self._emit(self.batcher.finish())

    def _restore(self, crops: list) -> list:
        t = time.perf_counter()
        try:
            out = restore_faces(self.restorer, crops)
        finally:
            self.stats.model_s += time.perf_counter() - t
        self.stats.faces += len(crops)
        return out

    def _emit(self, photos) -> None:
        for p in photos:
            error = None if p.error is None else error_message(p.tag, p.error)
            self.emit((p.tag, p.prepared, p.restored, error))


def _write(restorer, item: tuple, options: WriteOptions) -> dict[str, Any]:
    job, prepared, restored, error = item
    return write_or_failure_row(restorer, job, prepared, restored, options, error)


def restore_collection(restorer, jobs: Iterable[PhotoJob], on_row: Callable[[dict[str, Any]], None],
                       options: WriteOptions = WriteOptions(), prefetch: int = 8) -> RunStats:
    """Restore ``jobs`` with ``restorer`` (a :class:`~osdface.face.FaceRestorer` with its pipeline).

    Args:
        jobs: photos and their outputs (videos are not photos: the CLI runs them separately).
        on_row: called with each photo's report row, in job order, right after its outputs are
            written (from the writer thread; with ``prefetch=0`` from this one). An exception it
            raises (a report that cannot be written) stops the run and is re-raised here.
        options: side outputs.
        prefetch: photos that may wait before and after the model stage; ``0`` runs the stages
            one after the other in this thread (no overlap).

    Returns:
        :class:`RunStats`. Per-photo failures are rows, never exceptions.
    """
    stats = RunStats()
    t0 = time.perf_counter()

    def report(row: dict[str, Any]) -> None:
        on_row(row)
        stats.photos += 1
        stats.failed += row["error"] is not None

    if prefetch <= 0:
        def emit(item: tuple) -> None:
            t = time.perf_counter()
            report(_write(restorer, item, options))
            stats.model_wait_s += time.perf_counter() - t

        stage = _ModelStage(restorer, emit, stats, hold=prefetch)
        for job in jobs:
            t = time.perf_counter()
            item = prepare_or_error(restorer, job)
            stats.model_wait_s += time.perf_counter() - t
            stage.add(job, item)
        stage.finish()
        stats.wall_s = time.perf_counter() - t0
        return stats

    in_q: queue.Queue = queue.Queue(maxsize=prefetch)
    out_q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    failures: list[BaseException] = []

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for job in jobs:
                if not put(in_q, (job, prepare_or_error(restorer, job))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised there
            failures.append(exc)
            stop.set()
        finally:
            put(in_q, _END)

    def writer() -> None:
        try:
            while True:
                try:
                    item = out_q.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                if item is _END:
                    return
                report(_write(restorer, item, options))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised there
            failures.append(exc)
            stop.set()

    def emit(item: tuple) -> None:
        t = time.perf_counter()
        put(out_q, item)
        stats.model_wait_s += time.perf_counter() - t

    threads = [threading.Thread(target=reader, name="osdface-read", daemon=True),
               threading.Thread(target=writer, name="osdface-write", daemon=True)]
    for th in threads:
        th.start()
    stage = _ModelStage(restorer, emit, stats, hold=prefetch)
    try:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                item = in_q.get(timeout=0.1)
            except queue.Empty:
                stats.model_wait_s += time.perf_counter() - t
                continue
            stats.model_wait_s += time.perf_counter() - t
            if item is _END:
                break
            stage.add(*item)
        if not stop.is_set():
            stage.finish()
            put(out_q, _END)
        threads[1].join()
    finally:
        stop.set()
        for th in threads:
            th.join()
    if failures:
        raise failures[0]
    stats.wall_s = time.perf_counter() - t0
    return stats
