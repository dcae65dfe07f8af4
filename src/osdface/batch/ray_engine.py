"""Restore a collection on Ray Data: many GPUs, many machines (issue 15; extra ``osdface[scale]``).

The job is a Ray Data stream of *paths* (not pixels) through the stages of
:mod:`osdface.batch.stages`::

    paths ─▶ prepare (CPU tasks: read, detect, align)
          ─▶ model (an actor pool: ``workers`` actors, each loads the model once and restores the
             faces of many photos per call, in full batches)
          ─▶ write (CPU tasks: paste back, encode, write atomically)
          ─▶ report rows, back to the driver (which appends them to the report as they come)

Ray Data streams the blocks with back-pressure (a bounded amount of work in flight between the
stages). Failed tasks are retried (``max_retries``); a dead model actor is restarted and its
batch retried. Per-photo failures (unreadable, truncated, huge or non-image files; a failed write)
are report rows and the job goes on. A block that still fails after its retries is dropped (Ray
Data's ``max_errored_blocks``); its photos come back in :attr:`RayRunStats.lost`, by name, never
silently, and a re-run with the same report and ``--skip-existing`` restores them.

Outputs are written by the write tasks, wherever they run: on a cluster the output folder must be
shared storage (NFS, a mounted bucket) at the same path on every node; so must the inputs and the
model folder (or bake them into the node image). Each photo is written exactly as the
single-process engine writes it (same stage functions, full model batches): same bytes on the
same kind of device, precision, thread count and batch size.

The stage builders are passed in (:class:`RayStages`: picklable callables), so this layer never
imports the command line: the CLI passes ``functools.partial`` objects over its own builders.
"""

from __future__ import annotations

import json
import math
import pickle
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import first_line
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


@dataclass(frozen=True)
class RayStages:
    """How each worker builds what it needs (picklable: shipped to every worker).

    Attributes:
        face_stage: ``() -> FaceRestorer`` without a pipeline (detector, filters, paste-back,
            background): used by the CPU tasks, built once per worker process.
        model_stage: ``() -> FaceRestorer`` with its pipeline: built once per model actor.
        options: side outputs.
        key: identifies this run's builders in the per-process cache.
    """

    face_stage: Callable[[], Any]
    model_stage: Callable[[], Any]
    options: WriteOptions = WriteOptions()
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class RayRunStats:
    """Counts and times of a Ray run.

    Attributes:
        photos / failed / faces: rows reported, failed rows, faces in the reported photos.
        wall_s: from the first submitted block to the last row.
        lost: inputs with no row (their block failed after every retry, or the job stopped).
        lost_reason: why, one line (``None`` when nothing was lost).
    """

    photos: int = 0
    failed: int = 0
    faces: int = 0
    wall_s: float = 0.0
    lost: list[str] = field(default_factory=list)
    lost_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_BUILT: dict[str, Any] = {}  # per worker process: RayStages.key → face-stage restorer


def _face_restorer(stages: RayStages):
    restorer = _BUILT.get(stages.key)
    if restorer is None:
        restorer = _BUILT[stages.key] = stages.face_stage()
    return restorer


def _jobs(batch: dict[str, np.ndarray]) -> list[PhotoJob]:
    return [PhotoJob(Path(i), Path(o)) for i, o in zip(batch["input"].tolist(), batch["output"].tolist())]


def _prepare_batch(batch: dict[str, np.ndarray], stages: RayStages) -> dict[str, np.ndarray]:
    """CPU stage 1: read + detect + align each photo; the prepared photo travels pickled."""
    restorer = _face_restorer(stages)
    blobs, errors = [], []
    for job in _jobs(batch):
        prepared = prepare_or_error(restorer, job)
        failed = isinstance(prepared, BaseException)
        blobs.append(b"" if failed else pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL))
        errors.append(error_message(job, prepared) if failed else "")
    return {"input": batch["input"], "output": batch["output"],
            "prepared": np.array(blobs, dtype=object), "error": np.array(errors, dtype=object)}


class _ModelActor:
    """The model stage: one pipeline per actor; the faces of every photo of a call are restored
    together, in full batches (:func:`~osdface.batch.stages.restore_faces`)."""

    def __init__(self, stages: RayStages, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.restorer = stages.model_stage()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = _jobs(batch)
        errors = list(batch["error"].tolist())
        blobs = list(batch["prepared"].tolist())
        photos = {k: pickle.loads(b) for k, (b, e) in enumerate(zip(blobs, errors)) if not e}
        crops = [f.lq for k in sorted(photos) for f in photos[k].faces]
        try:
            restored = restore_faces(self.restorer, crops)
        except Exception as exc:  # noqa: BLE001 - a model failure fails this call's photos (reason kept)
            logger.debug("model batch failed", exc_info=True)
            for k in photos:
                errors[k] = error_message(jobs[k], exc)
            photos = {}
            restored = []
        it = iter(restored)
        for k in sorted(photos):
            for f in photos[k].faces:
                f.restored = next(it)
            blobs[k] = pickle.dumps(photos[k], protocol=pickle.HIGHEST_PROTOCOL)
        return {"input": batch["input"], "output": batch["output"],
                "prepared": np.array(blobs, dtype=object), "error": np.array(errors, dtype=object)}


def _write_batch(batch: dict[str, np.ndarray], stages: RayStages) -> dict[str, np.ndarray]:
    """CPU stage 2: paste back and write; → the report rows as JSON text."""
    restorer = _face_restorer(stages)
    rows = []
    for job, blob, error in zip(_jobs(batch), batch["prepared"].tolist(), batch["error"].tolist()):
        prepared = pickle.loads(blob) if not error else None
        restored = [f.restored for f in prepared.faces] if prepared is not None else []
        rows.append(json.dumps(write_or_failure_row(restorer, job, prepared, restored, stages.options, error or None)))
    return {"row": np.array(rows, dtype=object)}


def restore_collection_ray(
    jobs: Sequence[PhotoJob],
    stages: RayStages,
    on_row: Callable[[dict[str, Any]], None],
    *,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    stage_cpus: float = 1.0,
    photos_per_call: int = 8,
    max_retries: int = 3,
    address: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> RayRunStats:
    """Restore ``jobs`` on Ray; ``on_row`` gets each photo's report row as it arrives (any order).

    Args:
        jobs: photos and their outputs (planned by the caller: :mod:`osdface.batch.inputs`).
        stages: the builders (:class:`RayStages`).
        workers: model actors (one per GPU, typically).
        gpus_per_worker / cpus_per_worker: what each model actor reserves (``gpus_per_worker=None``:
            1 when the cluster has GPUs, else 0). Without a GPU the actor
            runs torch with ``max(1, int(cpus_per_worker))`` threads.
        stage_cpus: what each read/detect/align and paste/write task reserves.
        photos_per_call: photos per model-actor call (their faces are batched together).
        max_retries: retries of a failed task; restarts of a dead actor (and retries of its call).
        address: the Ray cluster (``"auto"``, ``"ray://host:10001"``); ``None``: join the Ray
            instance this process already started, else start a local one (shut down at the end).
        init_kwargs: more ``ray.init`` arguments when this call starts Ray.

    Returns:
        :class:`RayRunStats` (the inputs without a row are in ``lost``).

    Raises:
        InvalidSettingError: this call started a local Ray and the model workers would take all its
            CPUs or GPUs (the read/write tasks could never run).
        Whatever ``on_row`` raises (a report that cannot be written) stops the job.
    """
    import ray
    import ray.data
    from ray.exceptions import RayError

    stats = RayRunStats()
    if not jobs:
        return stats
    started = False
    ctx = saved_errored_blocks = None
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False}
        kwargs.update(init_kwargs or {})
        ray.init(address=address, **kwargs)
        started = True
    elif address:
        logger.info("Ray is already initialised in this process; --ray-address %s is not used", address)
    try:
        total = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if total.get("GPU", 0.0) > 0 else 0.0
        _check_resources(total, workers, gpus_per_worker, cpus_per_worker, stage_cpus,
                         local=started and address is None)
        ctx = ray.data.DataContext.get_current()
        saved_errored_blocks = ctx.max_errored_blocks  # the caller's setting, restored at the end
        ctx.max_errored_blocks = -1  # a block failing after its retries is dropped; its photos are reported lost
        n = len(jobs)
        ds = ray.data.from_items([{"input": str(j.input), "output": str(j.output)} for j in jobs],
                                 override_num_blocks=max(1, math.ceil(n / max(1, photos_per_call))))
        threads = None if gpus_per_worker else max(1, int(cpus_per_worker))
        with warnings.catch_warnings():
            # Ray Data's defaults retry a crashed task and restart a dead actor forever, so one photo that
            # kills its worker every time would stall the job; the bounds can only be passed as
            # ray_remote_args, which Ray 2.60 marks deprecated (removal announced for 2.64) without a
            # named replacement yet.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(_prepare_batch, fn_args=(stages,), batch_size=1, num_cpus=stage_cpus,
                                max_retries=max_retries)
            ds = ds.map_batches(_ModelActor, fn_constructor_args=(stages, threads), batch_size=photos_per_call,
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker,
                                max_restarts=max_retries, max_task_retries=max_retries)
            ds = ds.map_batches(_write_batch, fn_args=(stages,), batch_size=1, num_cpus=stage_cpus,
                                max_retries=max_retries)
        t0 = time.perf_counter()
        seen: set[str] = set()
        rows = iter(ds.iter_rows())
        while True:
            try:
                item = next(rows)
            except StopIteration:
                break
            except RayError as exc:
                stats.lost_reason = f"the Ray job stopped: {first_line(exc)}"
                logger.debug("Ray job failed", exc_info=True)
                break
            row = json.loads(item["row"])
            on_row(row)
            seen.add(row["input"])
            stats.photos += 1
            stats.failed += row["error"] is not None
            stats.faces += len(row["faces"])
        stats.wall_s = time.perf_counter() - t0
        stats.lost = [str(j.input) for j in jobs if str(j.input) not in seen]
        if stats.lost and stats.lost_reason is None:
            stats.lost_reason = "their block failed after every retry (see the Ray logs)"
    finally:
        if ctx is not None:
            ctx.max_errored_blocks = saved_errored_blocks
        if started:
            ray.shutdown()
    return stats


def _check_resources(total: dict[str, float], workers: int, gpus: float, cpus: float, stage_cpus: float,
                     local: bool = False) -> None:
    """Check that the cluster, as it is now, can run the job.

    On a cluster an autoscaler may still add nodes, so a shortfall is a warning. On a local Ray this
    call started (``local``) nothing will be added: the model workers would take every CPU (or GPU)
    and the read/write tasks never be scheduled, a permanent stall, so it is refused.

    Raises:
        InvalidSettingError: ``local`` and the workers leave no room (one line: the numbers and what to pass).
    """
    from ..errors import InvalidSettingError

    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if workers * gpus > have_gpu:
        if local:
            raise InvalidSettingError(
                f"--workers {workers} x --gpus-per-worker {gpus:g} need {workers * gpus:g} GPUs; the local Ray "
                f"has {have_gpu:g}: pass --workers {max(1, int(have_gpu // gpus)) if gpus else 1} "
                "(or fewer --gpus-per-worker)")
        logger.warning("%d workers x %g GPUs need %g GPUs; the Ray cluster has %g now (waiting for an autoscaler?)",
                       workers, gpus, workers * gpus, have_gpu)
    if workers * cpus + stage_cpus > have_cpu:
        if local:
            fit = (have_cpu - stage_cpus) / workers
            hint = (f"pass --cpus-per-worker {math.floor(fit * 100) / 100:g} or fewer --workers" if fit >= 0.01
                    else "pass fewer --workers")
            raise InvalidSettingError(
                f"--workers {workers} x --cpus-per-worker {cpus:g} leave less than {stage_cpus:g} CPU for the read "
                f"and write stages on the local Ray's {have_cpu:g} CPUs (the job would stall); {hint}")
        logger.warning("%d workers x %g CPUs leave less than %g CPU for the read and write stages on a cluster "
                       "with %g CPUs; lower --workers or --cpus-per-worker (or wait for an autoscaler)",
                       workers, cpus, stage_cpus, have_cpu)
