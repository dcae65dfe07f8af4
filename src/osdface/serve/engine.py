"""RestoreEngine: one restoration request from bytes to encoded result, with faces batched across requests.

The stages of :class:`~osdface.face.FaceRestorer`, spread over two kinds of threads:

1. CPU threads (``ServeConfig.cpu_workers``): decode (header checked first), detect, align —
   :meth:`FaceRestorer.prepare`; each thread has its own detector (YuNet keeps per-call state);
2. model threads (one per replica): :meth:`FaceRestorer.restore_crops` on a batch that holds the faces
   of every request waiting (:class:`~osdface.serve.batcher.FaceBatcher`);
3. CPU threads again: :meth:`FaceRestorer.finish` (background upscale, paste-back) and encoding.

So the CPU work of one request never holds the model for the others. Admission is bounded
(``max_queue`` requests in the engine; one more gets 503 with ``Retry-After``), every request has a
deadline (504), and the number of faces per photo is capped, so nothing grows without end.
Used by the HTTP app (:mod:`osdface.serve.app`) and the Gradio demo (:mod:`osdface.serve.demo`).
"""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from ..face.restorer import FaceRestorer, PreparedPhoto
from ..face.types import FaceCrop
from ..image import ImageError, ImageFormatError, ImageTooLargeError, LoadedImage, decode_image, encode_image
from ..utils.logging import get_logger
from .batcher import FaceBatcher
from .config import MAX_OUTPUT_SIDE, MEDIA_TYPES, RequestError, RestoreOptions, ServeConfig
from .metrics import ServeMetrics

logger = get_logger(__name__)
T = TypeVar("T")

#: smallest aligned crop accepted (a colour fix needs some pixels; FFHQ crops are 512)
MIN_ALIGNED_SIDE = 16


def _current_task_cancelling() -> bool:
    """Whether the running task itself is being cancelled (a client gone, a deadline), as opposed to
    an awaited future cancelled under it (the CPU pool's ``cancel_futures`` at close)."""
    task = asyncio.current_task()
    return task is not None and getattr(task, "cancelling", lambda: 0)() > 0  # Task.cancelling: Python 3.11+


@dataclass
class RestoreOutcome:
    """The result of one request.

    Attributes:
        image: ``(H', W', 3)`` uint8 RGB output (the photo × upscale, or the restored aligned crop).
        alpha: its alpha channel, when the input had one.
        faces: the faces restored (``lq`` and ``restored`` crops; detection box, landmarks and score);
            empty for an aligned crop.
        encoded: ``image`` encoded in ``options.output_format``.
        media_type: of ``encoded``.
        input_size: ``(H, W)`` of the input.
        options: the options the request was run with.
        seconds: time from admission to the encoded result.
        aligned_lq: the aligned input crop (``options.aligned`` only).
        input_rgb: the decoded input (the demo's "before").
    """

    image: np.ndarray
    alpha: np.ndarray | None
    faces: list[FaceCrop]
    encoded: bytes
    media_type: str
    input_size: tuple[int, int]
    options: RestoreOptions
    seconds: float = 0.0
    aligned_lq: np.ndarray | None = field(default=None, repr=False)
    input_rgb: np.ndarray | None = field(default=None, repr=False)

    def report(self) -> dict:
        """The ``format=json`` answer: sizes, faces (box, landmarks, score, and the identity similarity
        when the engine computes it: :meth:`osdface.face.types.FaceCrop.to_json`) and the image in base64."""
        h, w = self.input_size
        return {
            "input_size": [w, h],
            "output_size": [int(self.image.shape[1]), int(self.image.shape[0])],
            "aligned": self.options.aligned,
            "upscale": self.options.upscale,
            "faces": [f.to_json() for f in self.faces],
            "image_format": self.options.output_format,
            "image": base64.b64encode(self.encoded).decode("ascii"),
            "seconds": round(self.seconds, 4),
        }


class RestoreEngine:
    """Restore photos with ``len(pipelines)`` model replicas, batching faces across concurrent requests.

    Args:
        config: limits and batching (:class:`ServeConfig`).
        pipelines: one pipeline (or exported runner) per replica, all of the same model.
        face_models: builds ``{"detector", "parser", "bg_upsampler"}`` (as
            :func:`osdface.cli.restore_photos.build_face_models`) and optionally ``"identity"`` (an
            :class:`~osdface.face.identity.IdentityScorer`: each face's identity similarity in the
            ``format=json`` report); called once per CPU thread.

    Call :meth:`restore` from one event loop (the engine starts itself in the first one that calls it).
    """

    def __init__(self, config: ServeConfig, pipelines: Sequence, face_models: Callable[[], dict]) -> None:
        if len(pipelines) != config.replicas:
            raise ValueError(f"{len(pipelines)} pipelines for {config.replicas} replicas")
        self.config = config
        self.face_size = int(getattr(pipelines[0], "resolution", 512))
        # one restorer per replica and colour fix: restore_crops applies the fix in float, as the CLI does
        self._model_restorers = [
            {cf: FaceRestorer(p, detector=None, color_fix=cf, batch_size=config.max_batch, bg_upsampler=None)
             for cf in ("wavelet", "adain", "none")}
            for p in pipelines
        ]
        self._face_models = face_models
        self._local = threading.local()
        self.metrics = ServeMetrics(config.max_batch)
        self.cpu_executor = ThreadPoolExecutor(config.cpu_workers, thread_name_prefix="osdface-cpu")
        self._batcher: FaceBatcher | None = None
        self._in_flight = 0
        self._closed = False
        self.metrics.watch(lambda: self._batcher.pending() if self._batcher else 0,
                           lambda: self._batcher.busy if self._batcher else 0)

    # ------------------------------------------------------------------ life cycle
    @property
    def batcher(self) -> FaceBatcher | None:
        """The face batcher (items ``(crop, color_fix)``), once started; ``None`` before."""
        return self._batcher

    @property
    def ready(self) -> bool:
        """Models loaded and the batcher running (``/readyz``)."""
        return self._batcher is not None and not self._closed

    async def start(self) -> None:
        """Start the batcher in the running loop (idempotent; :meth:`restore` calls it)."""
        if self._closed:
            raise self._shutting_down()
        if self._batcher is None:
            self._batcher = FaceBatcher(self._run_batch, replicas=self.config.replicas,
                                        max_batch=self.config.max_batch, max_wait_s=self.config.batch_wait_ms / 1000,
                                        closed_error=self._shutting_down)

    def _shutting_down(self) -> RequestError:
        return RequestError(503, "the service is shutting down", {"Retry-After": str(self.config.retry_after_s)})

    async def close(self) -> None:
        """Stop the batcher and the CPU threads; faces not restored yet fail with 503 (:meth:`_shutting_down`)."""
        self._closed = True
        if self._batcher is not None:
            await self._batcher.close()
        self.cpu_executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one request
    async def restore(self, image: bytes | LoadedImage, options: RestoreOptions) -> RestoreOutcome:
        """Restore one photo (encoded bytes, or an already decoded image) with ``options``:
        :meth:`admitted` around :meth:`restore_admitted`.

        Raises:
            RequestError: 413/415/400 for the image, 503 when ``max_queue`` requests are in already
                (with ``Retry-After``) or the engine is closed, 504 past ``request_timeout_s``.
        """
        return await self.admitted(lambda: self.restore_admitted(image, options))

    async def admitted(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work()`` as one admitted request: refused with 503 (``Retry-After``) when ``max_queue``
        requests are in already, cancelled with 504 past ``request_timeout_s``.

        The HTTP app admits a request *before* reading its body, so bodies in memory are bounded by
        ``max_queue × max_upload_bytes`` and a slow upload counts against the deadline.
        """
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self._closed:
            raise self._shutting_down()
        if self._in_flight >= self.config.max_queue:
            raise RequestError(503, f"the service is busy ({self._in_flight} requests in progress); retry later",
                               retry)
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            return await asyncio.wait_for(work(), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than {self.config.request_timeout_s:g} s") from None
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()

    async def restore_admitted(self, image: bytes | LoadedImage, options: RestoreOptions) -> RestoreOutcome:
        """The restoration itself, for a caller inside :meth:`admitted`."""
        await self.start()
        start = time.monotonic()
        out = await self._run(image, options)
        out.seconds = time.monotonic() - start
        return out

    async def _run(self, image, options: RestoreOptions) -> RestoreOutcome:
        prepared, restorer = await self._on_cpu(self._prepare, image, options)
        crops = [f.lq for f in prepared.faces] if restorer is not None else [prepared.rgb]
        restored = await self._batcher.submit([(c, options.color_fix) for c in crops]) if crops else []
        return await self._on_cpu(self._finish, prepared, restorer, restored, options)

    async def _on_cpu(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in a CPU thread. After :meth:`close` the pool refuses new work and cancels what
        waited for a thread: both answer 503 (:meth:`_shutting_down`), as the model stage does."""
        if self._closed:
            raise self._shutting_down()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.cpu_executor, fn, *args)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            if self._closed:
                raise self._shutting_down() from None
            raise
        except asyncio.CancelledError:
            if self._closed and not _current_task_cancelling():  # the pool cancelled it, not the client
                raise self._shutting_down() from None
            raise

    # ------------------------------------------------------------------ CPU stages (CPU threads)
    def _thread_face_models(self) -> dict:
        models = getattr(self._local, "models", None)
        if models is None:
            models = self._local.models = self._face_models()
        return models

    def _decode(self, image) -> LoadedImage:
        cfg = self.config
        if isinstance(image, LoadedImage):
            h, w = image.rgb.shape[:2]
            if h * w > cfg.max_pixels:
                raise RequestError(413, f"image is {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of "
                                        f"{cfg.max_pixels / 1e6:.1f} MP")
            return image
        if not image:
            raise RequestError(400, "no image in the request")
        try:
            return decode_image(image, max_pixels=cfg.max_pixels, formats=cfg.formats, name="uploaded image")
        except ImageTooLargeError as e:
            raise RequestError(413, str(e)) from None
        except ImageFormatError as e:
            raise RequestError(415, str(e)) from None
        except ImageError as e:
            raise RequestError(400, str(e)) from None

    @staticmethod
    def _check_output_side(ow: int, oh: int, options: RestoreOptions) -> None:
        fmt = options.output_format
        if max(ow, oh) > MAX_OUTPUT_SIDE[fmt]:
            how = f"upscale {options.upscale:g} makes" if options.upscale != 1 else "the output is"
            raise RequestError(413, f"{how} {ow}x{oh}, above the {fmt} limit of {MAX_OUTPUT_SIDE[fmt]} px a side; "
                                    "ask for a smaller upscale or format=png")

    def _prepare(self, image, options: RestoreOptions) -> tuple[PreparedPhoto, FaceRestorer | None]:
        loaded = self._decode(image)
        h, w = loaded.rgb.shape[:2]
        if options.aligned:
            self._check_output_side(w, h, options)
            if h != w:
                raise RequestError(400, f"aligned=true needs a square face crop, got {w}x{h}")
            if h < MIN_ALIGNED_SIDE:
                raise RequestError(400, f"aligned crop of {w}x{h} is too small (at least {MIN_ALIGNED_SIDE} px a side)")
            return PreparedPhoto(rgb=loaded.rgb, alpha=loaded.alpha), None
        oh, ow = math.ceil(h * options.upscale), math.ceil(w * options.upscale)
        if oh * ow > self.config.max_output_pixels:
            raise RequestError(413, f"upscale {options.upscale:g} of {w}x{h} makes {ow * oh / 1e6:.0f} MP, above the "
                                    f"output limit of {self.config.max_output_pixels / 1e6:.0f} MP")
        self._check_output_side(ow, oh, options)
        models = self._thread_face_models()
        cap = self.config.max_faces
        restorer = FaceRestorer(
            None, detector=models["detector"], upscale=options.upscale, face_size=self.face_size,
            color_fix=options.color_fix, bg_upsampler=models["bg_upsampler"], parser=models["parser"],
            max_faces=min(options.max_faces or cap, cap), min_face_size=options.min_face_size,
            only_center_face=options.only_center_face,
        )
        return restorer.prepare(loaded), restorer

    def _finish(self, prepared: PreparedPhoto, restorer: FaceRestorer | None, restored: list,
                options: RestoreOptions) -> RestoreOutcome:
        fmt = options.output_format
        if restorer is None:  # aligned crop: the restored crop is the answer
            image, faces, lq = restored[0], [], prepared.rgb
            alpha = prepared.alpha
        else:
            # the identity check runs in finish, on this CPU thread: this thread's scorer (an OpenCV net is
            # not safe to share between threads, and _prepare may have run on another thread)
            restorer.identity = self._thread_face_models().get("identity")
            result = restorer.finish(prepared, restored)
            image, faces, lq, alpha = result.image, result.faces, None, result.alpha
        self.metrics.faces.inc(len(restored))
        encoded = encode_image(image, alpha, fmt, quality=options.quality)
        return RestoreOutcome(image=image, alpha=alpha, faces=faces, encoded=encoded, media_type=MEDIA_TYPES[fmt],
                              input_size=prepared.rgb.shape[:2], options=options, aligned_lq=lq,
                              input_rgb=prepared.rgb)

    # ------------------------------------------------------------------ the model (replica threads)
    def _run_batch(self, replica: int, items: list[tuple[np.ndarray, str]]) -> list[np.ndarray | Exception]:
        """Restore a batch of ``(crop, color_fix)``; crops of one size and colour fix go in one model call.

        A group that fails gets its exception as the result of each of its items (the batcher fails those
        items only), so one client's crop never fails the faces of the others in the same batch. Running out
        of memory is a 503 (with ``Retry-After``), not a 500.
        """
        groups: dict[tuple, list[int]] = {}
        for i, (crop, cf) in enumerate(items):
            groups.setdefault((crop.shape, cf), []).append(i)
        out: list = [None] * len(items)
        for (shape, cf), idx in groups.items():
            t0 = time.monotonic()
            try:
                restored = self._model_restorers[replica][cf].restore_crops(np.stack([items[i][0] for i in idx]))
            except Exception as exc:  # noqa: BLE001 - delivered to this group's items, who report it
                err = self._model_error(exc, shape, len(idx))
                for i in idx:
                    out[i] = err
                continue
            self.metrics.batch_seconds.observe(time.monotonic() - t0)
            self.metrics.batch_size.observe(len(idx))
            for i, r in zip(idx, restored):
                out[i] = r
        return out

    def _model_error(self, exc: Exception, shape: tuple, n: int) -> Exception:
        """The error a failed model call hands to its items: out of memory → 503; anything else as it is
        (the app logs it with its traceback and answers one line)."""
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing it
            return RequestError(503, f"out of memory restoring {n} face crop(s) of {shape[1]}x{shape[0]}; retry "
                                     "later or send a smaller image", {"Retry-After": str(self.config.retry_after_s)})
        return exc
