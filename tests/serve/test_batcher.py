"""FaceBatcher: items of concurrent submitters share one batch while a replica is busy; bounds and failures."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from osdface.serve.batcher import FaceBatcher


class GatedModel:
    """A plain batch function that records its batches; the first call waits for ``gate`` (a busy replica)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[int]] = []
        self.replicas: list[int] = []

    def __call__(self, replica: int, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.replicas.append(replica)
        self.started.set()
        self.gate.wait(60)
        if -1 in items:
            raise ValueError("item -1 is poison")
        return [x * 10 for x in items]


async def _wait_started(model: GatedModel) -> None:
    await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 60)


def test_waiting_items_of_many_submitters_form_one_batch():
    async def main():
        model = GatedModel()
        b = FaceBatcher(model, replicas=1, max_batch=8, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit([1]))
        await _wait_started(model)  # the only replica is busy with [1]
        rest = [asyncio.ensure_future(b.submit([10 * i, 10 * i + 1])) for i in range(1, 4)]  # 3 requests, 6 faces
        await asyncio.sleep(0)
        assert b.pending() == 6
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        await b.close()
        return model, results

    model, results = asyncio.run(main())
    assert results == [[10], [100, 110], [200, 210], [300, 310]]
    assert model.batches == [[1], [10, 11, 20, 21, 30, 31]], "the six waiting faces went in one model call"


def test_max_batch_splits_and_one_is_no_batching():
    async def main(max_batch):
        model = GatedModel()
        b = FaceBatcher(model, replicas=1, max_batch=max_batch, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit([0]))
        await _wait_started(model)
        rest = asyncio.ensure_future(b.submit(list(range(1, 6))))
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(first, rest)
        await b.close()
        return [len(x) for x in model.batches]

    assert asyncio.run(main(2)) == [1, 2, 2, 1]
    assert asyncio.run(main(1)) == [1, 1, 1, 1, 1, 1]


def test_a_failing_batch_fails_only_its_items_and_the_batcher_goes_on():
    async def main():
        model = GatedModel()
        model.gate.set()
        b = FaceBatcher(model, replicas=1, max_batch=1, max_wait_s=0.0)
        with pytest.raises(ValueError, match="poison"):
            await b.submit([-1])
        ok = await b.submit([4])
        await b.close()
        return ok

    assert asyncio.run(main()) == [40]


def test_an_exception_as_a_result_fails_that_item_only():
    async def main():
        b = FaceBatcher(lambda r, items: [ValueError("bad item") if x < 0 else x * 10 for x in items], max_batch=8,
                        max_wait_s=0.0)
        out = await asyncio.gather(b.submit([-1]), b.submit([2, 3]), return_exceptions=True)
        await b.close()
        return out

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good == [20, 30]


def test_two_replicas_run_batches_concurrently():
    async def main():
        model = GatedModel()
        b = FaceBatcher(model, replicas=2, max_batch=4, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit([1]))
        await _wait_started(model)
        model.started.clear()
        second = asyncio.ensure_future(b.submit([2]))
        await _wait_started(model)  # replica 1 took [2] while replica 0 is still held
        assert b.busy == 2
        model.gate.set()
        await asyncio.gather(first, second)
        await b.close()
        return sorted(model.replicas)

    assert asyncio.run(main()) == [0, 1]


def test_cancelled_waiters_are_skipped():
    async def main():
        model = GatedModel()
        b = FaceBatcher(model, replicas=1, max_batch=8, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit([1]))
        await _wait_started(model)
        gone = asyncio.ensure_future(b.submit([2, 3]))
        kept = asyncio.ensure_future(b.submit([4]))
        await asyncio.sleep(0)
        gone.cancel()  # a request that timed out
        model.gate.set()
        out = await asyncio.gather(first, kept)
        await b.close()
        return out, model.batches

    out, batches = asyncio.run(main())
    assert out == [[10], [40]] and batches == [[1], [4]]


def test_close_answers_the_running_batch_the_queue_and_later_submits():
    """close() while a batch runs: its waiters, the queued ones and a later submit all get closed_error()
    at once (before, the running batch's waiters were never answered)."""
    class Closed(Exception):
        pass

    async def main():
        model = GatedModel()
        b = FaceBatcher(model, replicas=1, max_batch=1, max_wait_s=0.0, closed_error=lambda: Closed("closing"))
        running = asyncio.ensure_future(b.submit([1]))
        await _wait_started(model)
        queued = asyncio.ensure_future(b.submit([2]))
        await asyncio.sleep(0)
        try:
            await b.close()
            out = await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 60)
            with pytest.raises(Closed):
                await b.submit([3])
        finally:
            model.gate.set()
        return out

    out = asyncio.run(main())
    assert [type(x) for x in out] == [Closed, Closed]


def test_engine_close_fails_waiting_faces_with_503(tiny_model_dir):
    from _serve_helpers import load_test_engine

    from osdface.serve.config import RequestError
    from osdface.testing import synthetic_faces

    engine = load_test_engine(tiny_model_dir, retry_after_s=7)
    crop = synthetic_faces(1, seed=2)[0]
    gate, started = threading.Event(), threading.Event()
    restorer = engine._model_restorers[0]["wavelet"]
    real = restorer.restore_crops

    def held(crops):
        started.set()
        gate.wait(60)
        return real(crops)

    restorer.restore_crops = held

    async def main():
        await engine.start()
        batcher = engine.batcher
        running = asyncio.ensure_future(batcher.submit([(crop, "wavelet")]))
        try:
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)
            await engine.close()
            [err] = await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 60)
            with pytest.raises(RequestError) as later:
                await batcher.submit([(crop, "wavelet")])
        finally:
            gate.set()
        return err, later.value

    for err in asyncio.run(main()):
        assert isinstance(err, RequestError) and err.status == 503 and "shutting down" in err.message
        assert err.headers == {"Retry-After": "7"}


def test_bounds_are_checked():
    async def main():
        with pytest.raises(ValueError):
            FaceBatcher(lambda r, x: x, replicas=0)
        with pytest.raises(ValueError):
            FaceBatcher(lambda r, x: x, max_batch=0)

    asyncio.run(main())


def test_model_runs_while_every_cpu_thread_is_busy(tiny_model_dir):
    """The engine's model replicas have their own threads: a face reaches the model and comes back while the
    only CPU thread (decoding, detection, paste-back of other requests) is held."""
    from _serve_helpers import load_test_engine

    from osdface.testing import synthetic_faces

    engine = load_test_engine(tiny_model_dir, cpu_workers=1)
    crop = synthetic_faces(1, seed=2)[0]
    gate = threading.Event()

    async def main():
        await engine.start()
        held = engine.cpu_executor.submit(gate.wait, 120)
        try:
            [restored] = await asyncio.wait_for(engine.batcher.submit([(crop, "wavelet")]), 120)
            still_held = not held.done()
        finally:
            gate.set()
            await engine.close()
        return restored, still_held

    restored, still_held = asyncio.run(main())
    assert still_held, "the CPU thread was held the whole time"
    assert restored.shape == crop.shape and restored.dtype == np.uint8


@pytest.mark.parametrize("error,status", [(MemoryError, 503), (ValueError, None)])
def test_a_failing_face_group_fails_only_its_own_requests(tiny_model_dir, error, status):
    """One batch holds two groups (two crop sizes, two clients); the model call of one raises: the other
    client's face is restored, the failing one gets the error (out of memory: 503 with Retry-After)."""
    from _serve_helpers import load_test_engine

    from osdface.serve.config import RequestError
    from osdface.testing import synthetic_faces

    # a batch is taken as soon as it holds 2 faces (the long wait only makes sure both go in one batch)
    engine = load_test_engine(tiny_model_dir, max_batch=2, batch_wait_ms=10_000)
    good, huge = synthetic_faces(1, seed=2)[0], np.zeros((96, 96, 3), np.uint8)
    restorer = engine._model_restorers[0]["wavelet"]
    real = restorer.restore_crops
    batches: list[int] = []

    def restore_crops(crops):
        batches.append(len(crops))
        if crops.shape[1] == 96:
            raise error("the huge crop does not fit")
        return real(crops)

    restorer.restore_crops = restore_crops
    run_batch = engine._run_batch
    model_batches: list[int] = []
    engine._run_batch = lambda replica, items: model_batches.append(len(items)) or run_batch(replica, items)

    async def main():
        await engine.start()
        try:
            return await asyncio.wait_for(asyncio.gather(engine.batcher.submit([(huge, "wavelet")]),
                                                         engine.batcher.submit([(good, "wavelet")]),
                                                         return_exceptions=True), 120)
        finally:
            await engine.close()

    bad, ok = asyncio.run(main())
    assert model_batches == [2] and batches == [1, 1], "both groups ran in one batch, one model call each"
    assert isinstance(ok, list) and ok[0].shape == good.shape and ok[0].dtype == np.uint8
    if status is None:
        assert isinstance(bad, error)
    else:
        assert isinstance(bad, RequestError) and bad.status == status and "out of memory" in bad.message
        assert "Retry-After" in bad.headers


def test_engine_close_answers_cpu_stage_requests_with_503(tiny_model_dir):
    """close() while a request waits for a CPU thread (the pool cancels it) and a request arriving
    after close: both 503 with Retry-After, like faces waiting for the model — never a 500."""
    from _serve_helpers import load_test_engine

    from osdface.image import encode_image
    from osdface.serve.config import RequestError, RestoreOptions
    from osdface.testing import synthetic_faces

    engine = load_test_engine(tiny_model_dir, retry_after_s=5, cpu_workers=1)
    png = encode_image(synthetic_faces(1, seed=3)[0])
    gate, started = threading.Event(), threading.Event()

    def hold():
        started.set()
        gate.wait(60)

    async def main():
        await engine.start()
        loop = asyncio.get_running_loop()
        blocker = loop.run_in_executor(engine.cpu_executor, hold)  # the only CPU thread is busy
        waiting = asyncio.ensure_future(engine.restore(png, RestoreOptions(aligned=True)))
        try:
            await loop.run_in_executor(None, started.wait, 60)
            await asyncio.sleep(0)  # the request is queued for the CPU thread
            await engine.close()
            [err] = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 60)
            [late] = await asyncio.gather(engine.restore(png, RestoreOptions(aligned=True)), return_exceptions=True)
        finally:
            gate.set()
            await blocker
        return err, late

    for err in asyncio.run(main()):
        assert isinstance(err, RequestError) and err.status == 503 and "shutting down" in err.message
        assert err.headers == {"Retry-After": "5"}
