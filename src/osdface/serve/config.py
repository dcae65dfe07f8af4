"""Server settings (:class:`ServeConfig`) and per-request options (:class:`RestoreOptions`) of ``osdface serve``.

Both are plain dataclasses whose constructors check every bound, so a bad flag fails at start-up with
one line (:class:`~osdface.errors.InvalidSettingError`, exit 2) and a bad request option gets a 400
(:class:`RequestError`). Light: no web stack, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..constants import MAX_IMAGE_PIXELS
from ..errors import InvalidSettingError, OSDFaceError

#: input formats the service can accept (PIL format names); the default accepts all three
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
#: ``format=`` values of ``POST /v1/restore``: an image, or the JSON report with the image in base64
OUTPUT_FORMATS = ("png", "jpeg", "webp", "json")
#: media types of the image outputs
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: longest side each output format can encode (libjpeg and libwebp limits; PNG's is far above any output limit)
MAX_OUTPUT_SIDE = {"png": 2**31 - 1, "jpeg": 65535, "webp": 16383}
COLOR_FIXES = ("wavelet", "adain", "none")


def one_line(text) -> str:
    """``text`` (anything ``str()`` takes) with every run of whitespace, newlines included, folded to one
    space: how every refusal's ``detail`` is sent (no multi-line bodies, no traceback layout)."""
    return " ".join(str(text).split())


class RequestError(OSDFaceError, ValueError):
    """A request the service refuses; ``status`` is the HTTP status, the message one line for the client.

    Args:
        status: 4xx for the client's mistakes, 503 when the service is full, 504 on timeout.
        message: the reason, one line (newlines are folded).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        message = one_line(message)
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})


def _bound(name: str, value, lo, hi=None) -> None:
    if not (lo <= value) or (hi is not None and not (value <= hi)):  # also refuses NaN
        where = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidSettingError(f"{name} must be {where}, got {value}")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service (``osdface serve`` flags; docs/serving.md lists the defaults' reasons).

    Args:
        host / port: where uvicorn listens (loopback by default: exposing it is a decision).
        max_batch: most faces in one model call (1 = no batching).
        batch_wait_ms: how long the first waiting face may wait for others to fill a batch.
        replicas: model workers, each with its own copy of the model, one thread each.
        cpu_workers: threads for decoding, detection, alignment, paste-back and encoding.
        max_upload_bytes: largest request body; larger ones get 413 before they are read.
        max_pixels: largest image (width × height from its header); larger ones get 413, undecoded.
        max_output_pixels: largest output (input pixels × upscale²); larger requests get 413.
        formats: accepted input formats (PIL names among :data:`INPUT_FORMATS`); others get 415.
        request_timeout_s: a request not answered by then gets 504 (its work still finishes and is dropped).
        max_queue: requests admitted at once (being decoded, waiting or restored); one more gets 503.
        max_faces: most faces restored per photo (the largest ones), so a request's model work is bounded.
        max_upscale: largest ``upscale`` a request may ask for.
        retry_after_s: the ``Retry-After`` of a 503.
        api_key: when set, every route but ``/healthz`` and ``/readyz`` needs it
            (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: float = 20.0
    replicas: int = 1
    cpu_workers: int = 2
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_output_pixels: int = 100_000_000
    formats: tuple[str, ...] = INPUT_FORMATS
    request_timeout_s: float = 60.0
    max_queue: int = 32
    max_faces: int = 16
    max_upscale: float = 4.0
    retry_after_s: int = 1
    api_key: str | None = None

    def __post_init__(self) -> None:
        _bound("port", self.port, 0, 65535)
        _bound("max_batch", self.max_batch, 1, 256)
        _bound("batch_wait_ms", self.batch_wait_ms, 0, 10_000)
        _bound("replicas", self.replicas, 1, 64)
        _bound("cpu_workers", self.cpu_workers, 1, 64)
        _bound("max_upload_bytes", self.max_upload_bytes, 1024, 1 << 31)
        _bound("max_pixels", self.max_pixels, 64 * 64, MAX_IMAGE_PIXELS)
        _bound("max_output_pixels", self.max_output_pixels, self.max_pixels, 4 * MAX_IMAGE_PIXELS)
        _bound("request_timeout_s", self.request_timeout_s, 0.001, 3600)
        _bound("max_queue", self.max_queue, 1, 100_000)
        _bound("max_faces", self.max_faces, 1, 256)
        _bound("max_upscale", self.max_upscale, 1, 8)
        _bound("retry_after_s", self.retry_after_s, 1, 3600)
        formats = tuple(f.upper() for f in self.formats)
        bad = [f for f in formats if f not in INPUT_FORMATS]
        if bad or not formats:
            raise InvalidSettingError(f"formats {list(self.formats)}: choose one or more of {', '.join(INPUT_FORMATS)}")
        object.__setattr__(self, "formats", formats)
        if self.api_key is not None and len(self.api_key) < 8:
            raise InvalidSettingError("api_key: the API key must have at least 8 characters")


def _parse_bool(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, f"option {name}={text!r}: expected true or false")


def _parse_number(name: str, text: str, kind, lo, hi):
    try:
        value = kind(text)
    except ValueError:
        raise RequestError(400, f"option {name}={text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not (lo <= value <= hi):  # also refuses NaN
        raise RequestError(400, f"option {name}={text!r}: must be in [{lo}, {hi}]")
    return value


def _parse_choice(name: str, text: str, choices) -> str:
    t = text.strip().lower()
    if t == "jpg" and "jpeg" in choices:
        t = "jpeg"
    if t not in choices:
        raise RequestError(400, f"option {name}={text!r}: choose from {', '.join(choices)}")
    return t


@dataclass(frozen=True)
class RestoreOptions:
    """Options of one ``POST /v1/restore`` (query parameters or multipart fields), as ``osdface restore`` has them.

    Args:
        aligned: the image is an FFHQ-aligned square face crop (no detection, no paste-back).
        upscale: output scale of a whole photo (1 … ``ServeConfig.max_upscale``).
        color_fix: ``wavelet`` (default), ``adain`` or ``none``.
        only_center_face: restore only the face closest to the centre.
        max_faces: restore at most this many faces (the largest; capped by ``ServeConfig.max_faces``).
        min_face_size: ignore faces whose longer box side is below this (pixels).
        format: ``png`` (default), ``jpeg``, ``webp``, or ``json`` for the report with the image in base64.
        image_format: the image's format inside the JSON report.
        quality: JPEG/WebP quality (1–100).
    """

    aligned: bool = False
    upscale: float = 1.0
    color_fix: str = "wavelet"
    only_center_face: bool = False
    max_faces: int | None = None
    min_face_size: float = 0.0
    format: str = "png"
    image_format: str = "png"
    quality: int = 95

    def __post_init__(self) -> None:
        if self.color_fix not in COLOR_FIXES:
            raise RequestError(400, f"color_fix {self.color_fix!r}: choose from {', '.join(COLOR_FIXES)}")
        if self.format not in OUTPUT_FORMATS:
            raise RequestError(400, f"format {self.format!r}: choose from {', '.join(OUTPUT_FORMATS)}")
        if self.image_format not in MEDIA_TYPES:
            raise RequestError(400, f"image_format {self.image_format!r}: choose from {', '.join(MEDIA_TYPES)}")
        if not (1 <= self.upscale < math.inf):  # also refuses NaN
            raise RequestError(400, f"upscale must be a finite number >= 1, got {self.upscale}")
        if not (0 <= self.min_face_size < math.inf):
            raise RequestError(400, f"min_face_size must be a finite number >= 0, got {self.min_face_size}")
        if self.aligned and self.upscale != 1:
            raise RequestError(400, "upscale applies to whole photos; an aligned crop is restored at its own size")

    @property
    def output_format(self) -> str:
        """The encoded image's format (``format``, or ``image_format`` inside JSON)."""
        return self.image_format if self.format == "json" else self.format

    @classmethod
    def parse(cls, values: Mapping[str, str], config: ServeConfig) -> RestoreOptions:
        """Options from request strings (``{"upscale": "2", "format": "json"}``), bounded by ``config``.

        Raises:
            RequestError: 400 for an unknown option or a bad value; the message names it.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise RequestError(400, f"unknown option {unknown[0]!r}; options are {', '.join(names)}")
        kw: dict = {}
        for name, text in values.items():
            if name in ("aligned", "only_center_face"):
                kw[name] = _parse_bool(name, text)
            elif name == "upscale":
                kw[name] = _parse_number(name, text, float, 1.0, config.max_upscale)
            elif name == "max_faces":
                kw[name] = _parse_number(name, text, int, 1, config.max_faces)
            elif name == "min_face_size":
                kw[name] = _parse_number(name, text, float, 0.0, 1e6)
            elif name == "quality":
                kw[name] = _parse_number(name, text, int, 1, 100)
            elif name == "color_fix":
                kw[name] = _parse_choice(name, text, COLOR_FIXES)
            elif name == "format":
                kw[name] = _parse_choice(name, text, OUTPUT_FORMATS)
            elif name == "image_format":
                kw[name] = _parse_choice(name, text, tuple(MEDIA_TYPES))
        return cls(**kw)
