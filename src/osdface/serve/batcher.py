"""Dynamic batching of faces across concurrent requests (asyncio; one model thread per replica).

Why our own (about 100 lines) and not a library — the candidates were tried against what the service
needs (docs/serving.md, "Why this stack"):

* ``async-batcher`` 0.2.2 refuses ``max_batch_size=1`` (so ``--max-batch 1``, batching off, cannot be
  expressed), and a waiter that is cancelled (a request timing out) makes its batch task raise
  ``InvalidStateError`` on ``set_result``, leaving the other waiters of that batch unanswered.
* ``batched`` (mixedbread) has no bound on its queue and runs one batch at a time (no replicas).
* LitServe batches whole requests inside its inference worker, so one request's face detection would
  hold the model; Ray Serve's ``@serve.batch`` fits but starts a cluster (GCS, raylet, proxy and one
  process per replica), too heavy for the 2-core machines this project is tested on.

Semantics: a face waits at most ``max_wait_s`` (counted from when the *oldest* waiting face arrived)
for others to fill a batch of ``max_batch``, whenever a replica is free; one collector at a time
assembles a batch, so concurrent replicas never split one. Each replica has one thread, so a replica's
model is never called concurrently. Waiters that went away (their futures cancelled) are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from ..utils.logging import get_logger

logger = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class FaceBatcher(Generic[T, R]):
    """Collect items from many coroutines into batches for ``run_batch(replica, items) -> results``.

    Args:
        run_batch: called in replica ``r``'s own thread with a list of items; returns one result per
            item, in order. A result that is an exception instance fails that item only; an exception
            raised fails every item of that batch (and only those).
        replicas: number of model workers (batches run concurrently, one per replica).
        max_batch: most items per batch (1 = no batching).
        max_wait_s: bounded wait for a batch to fill (0 = take what is there).
        closed_error: builds the exception given to items the batcher will not answer because it is
            closing (queued, or in a batch whose worker :meth:`close` stopped) and raised by :meth:`submit`
            after close; the engine's is a 503 with ``Retry-After``.

    Must be created and used inside one running event loop; :meth:`close` stops it.
    """

    def __init__(self, run_batch: Callable[[int, list[T]], Sequence[R]], replicas: int = 1, max_batch: int = 8,
                 max_wait_s: float = 0.02,
                 closed_error: Callable[[], BaseException] = lambda: RuntimeError("the batcher is closed")) -> None:
        if replicas < 1 or max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"replicas {replicas} and max_batch {max_batch} must be >= 1, max_wait_s >= 0")
        self._run_batch = run_batch
        self._closed_error = closed_error
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_s)
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()
        self._arrived = asyncio.Event()
        self._collecting = asyncio.Lock()
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"osdface-replica{r}") for r in range(replicas)]
        self._workers = [asyncio.get_running_loop().create_task(self._worker(r)) for r in range(replicas)]
        self.busy = 0  # replicas running a batch now

    def pending(self) -> int:
        """Items waiting for a replica (the queue length)."""
        return len(self._queue)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` (all at once, so a request's faces stay together) and wait for their results."""
        if not self._workers:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in items]
        self._queue.extend((item, fut, now) for item, fut in zip(items, futures))
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[T, asyncio.Future, float]]:
        """Wait for at least one item, then up to ``max_wait_s`` after the oldest for the batch to fill."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0][2] + self.max_wait_s
        while len(self._queue) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._queue and len(batch) < self.max_batch:
            entry = self._queue.popleft()
            if not entry[1].done():  # skip waiters that went away
                batch.append(entry)
        return batch

    async def _worker(self, replica: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._collecting:
                batch = await self._collect()
            if not batch:
                continue
            items = [item for item, _, _ in batch]
            self.busy += 1
            try:
                results = await loop.run_in_executor(self._executors[replica], self._run_batch, replica, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except asyncio.CancelledError:  # close() stopped this worker mid-batch: answer its waiters now
                self._fail([fut for _, fut, _ in batch])
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the waiters of this batch, who report it
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.busy -= 1
            for (_, fut, _), res in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def close(self) -> None:
        """Stop the workers and fail every item not answered yet (queued, or in a batch that was running: its
        thread finishes and the results are dropped) with ``closed_error()``."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._fail([fut for _, fut, _ in self._queue])
        self._queue.clear()
        for ex in self._executors:
            ex.shutdown(wait=False)

    def _fail(self, futures: list[asyncio.Future]) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_exception(self._closed_error())
