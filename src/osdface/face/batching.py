"""Faces of a stream of photos batched across photos; photos handed on in order, memory bounded.

One piece of logic for :meth:`FaceRestorer.restore_many <osdface.face.restorer.FaceRestorer.restore_many>`
and the collection engine (:mod:`osdface.batch.local`): each photo's faces join a queue of pending
faces, the model runs whenever ``batch_size`` of them wait, and photos leave in input order once all
their faces are restored. So that face-less photos after a lone face cannot pile up waiting for a
full batch, the pending faces are run early (a short batch) as soon as more than ``hold`` photos
wait: at most ``max(hold, batch_size) + 1`` photos are held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(eq=False)
class BatchedPhoto:
    """One photo in the batcher: what the caller tagged it with, its prepared faces, their restored
    crops (``None`` until restored), or the exception that stopped it."""

    tag: Any
    prepared: Any = None
    error: BaseException | None = None
    restored: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.error is not None or all(r is not None for r in self.restored)


class PhotoFaceQueue:
    """Batch the faces of photos across photos.

    Args:
        batch_size: faces per model call (a short call only to bound memory, and at the end).
        restore: crops → restored crops (same order); an exception fails the photos of that call.
        hold: photos that may wait before the pending faces are run early (``max(hold, batch_size)``).
    """

    def __init__(self, batch_size: int, restore: Callable[[list[np.ndarray]], Sequence[np.ndarray]],
                 hold: int = 0) -> None:
        self.batch_size, self.restore = int(batch_size), restore
        self.hold = max(int(hold), self.batch_size)
        self.order: deque[BatchedPhoto] = deque()
        self.pending: list[tuple[BatchedPhoto, int]] = []

    def add(self, tag: Any, item) -> list[BatchedPhoto]:
        """Queue a prepared photo (``.faces`` with ``.lq`` crops) or an exception; → the photos now done, in order."""
        photo = BatchedPhoto(tag)
        if isinstance(item, BaseException):
            photo.error = item
        else:
            photo.prepared, photo.restored = item, [None] * len(item.faces)
            self.pending.extend((photo, i) for i in range(len(item.faces)))
        self.order.append(photo)
        while len(self.pending) >= self.batch_size:
            self._run(self.batch_size)
        if self.pending and len(self.order) > self.hold:  # memory stays bounded: do not wait for a full batch
            self._run(len(self.pending))
        return self._drain()

    def finish(self) -> list[BatchedPhoto]:
        """Run what is pending; → every photo still held, in order."""
        while self.pending:
            self._run(self.batch_size)
        return self._drain()

    def _run(self, n: int) -> None:
        batch, self.pending = self.pending[:n], self.pending[n:]
        try:
            out = self.restore([p.prepared.faces[i].lq for p, i in batch])
        except Exception as exc:  # noqa: BLE001 - a model failure fails this batch's photos (reason kept)
            logger.debug("model batch failed", exc_info=True)
            for p, _ in batch:
                p.error = p.error or exc
            return
        for (p, i), r in zip(batch, out):
            p.restored[i] = r

    def _drain(self) -> list[BatchedPhoto]:
        done = []
        while self.order and self.order[0].done:
            done.append(self.order.popleft())
        return done
