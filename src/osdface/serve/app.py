"""The HTTP API of ``osdface serve`` (FastAPI on uvicorn; routes in docs/serving.md). Imports the web stack:
only the serve command imports this module.

* ``POST /v1/restore`` — the image as the raw body (``image/png``, ``image/jpeg``, ``image/webp`` or
  ``application/octet-stream``) or as the multipart field ``image``; options as query parameters or
  multipart fields (:class:`~osdface.serve.config.RestoreOptions`). Answers the image, or with
  ``format=json`` the report (faces: box, landmarks, score) and the image in base64.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (models loaded, batcher running),
  ``GET /metrics`` (Prometheus).

Every refusal is ``{"detail": "<one line>"}`` with a 4xx (or 503/504) status; an unexpected failure is
logged here with its traceback and answered 500 with one line, never the traceback. The request body
is read into memory under ``ServeConfig.max_upload_bytes`` (413 before reading when Content-Length
says more); nothing a client sends is used as a path (a multipart file name is ignored).
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .._version import __version__
from ..utils.logging import get_logger
from .config import RequestError, RestoreOptions, ServeConfig, one_line
from .engine import RestoreEngine

logger = get_logger(__name__)

#: routes that need no API key (load balancers and orchestrators probe them)
OPEN_ROUTES = ("/healthz", "/readyz")
#: routes counted by name in the metrics (anything else is ``other``, so labels stay bounded)
ROUTES = ("/v1/restore", "/healthz", "/readyz", "/metrics")
#: raw-body media types accepted (the format itself is read from the bytes)
RAW_TYPES = ("image/png", "image/jpeg", "image/webp", "image/jpg", "application/octet-stream")


def _error_body(message: str) -> bytes:
    import json

    return json.dumps({"detail": one_line(message)}).encode()


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = _error_body(message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Pure ASGI: metrics per route, the API key, and the body-size limit (in that order, outermost first).

    The body limit refuses a declared Content-Length over the limit at once, and counts a chunked body
    as it arrives, answering 413 as soon as it passes the limit.
    """

    def __init__(self, app, config: ServeConfig, engine: RestoreEngine) -> None:
        self.app, self.config, self.engine = app, config, engine
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        started = time.monotonic()
        status = {"code": 500}  # unless a response starts

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper, path)
        finally:
            m = self.engine.metrics
            m.requests.labels(route, str(status["code"])).inc()
            m.latency.labels(route).observe(time.monotonic() - started)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given, self._key)

    async def _guarded(self, scope, receive, send, path):
        if self._key is not None and path not in OPEN_ROUTES and not self._authorized(scope):
            self.engine.metrics.refused(401)
            return await _send_error(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY' "
                                                "or 'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})
        limit = self.config.max_upload_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                self.engine.metrics.refused(400)
                return await _send_error(send, 400, "malformed Content-Length header")
            if int(length) > limit:
                self.engine.metrics.refused(413)
                return await _send_error(send, 413, f"request body of {int(length)} bytes is above the limit "
                                                    f"of {limit} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        started = {"yes": False}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started["yes"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            self.engine.metrics.refused(413)
            if not started["yes"]:
                await _send_error(send, 413, f"request body is above the limit of {limit} bytes")


def create_app(engine: RestoreEngine):
    """The FastAPI application over ``engine`` (its limits are ``engine.config``).

    The engine starts with the application (lifespan) and is closed when it stops. No interactive
    docs routes: they load their scripts from a CDN, and the service must run offline.
    """
    config = engine.config

    @asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="osdface", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        engine.metrics.refused(exc.status)
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        engine.metrics.refused(exc.status_code)
        return JSONResponse({"detail": one_line(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        engine.metrics.refused(500)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not engine.ready:
            return JSONResponse({"detail": "not ready"}, status_code=503,
                                headers={"Retry-After": str(config.retry_after_s)})
        return {"status": "ready", "replicas": config.replicas, "face_size": engine.face_size}

    @app.get("/metrics")
    async def metrics():
        body, ctype = engine.metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/restore")
    async def restore(request: Request):
        # admitted before the body is read: bodies held at once are bounded, and a slow upload meets the deadline
        return await engine.admitted(lambda: _restore(request))

    async def _restore(request: Request):
        values: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            if key in values:
                raise RequestError(400, f"option {key!r} given twice")
            values[key] = value
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data = None
            # closed on the way out (also on a refusal): the spooled temp file of the upload goes at once
            async with request.form(max_files=1, max_fields=32) as form:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if key != "image":
                            raise RequestError(400, f"multipart file field {key!r}: send the image as the field "
                                                    "'image'")
                        data = await value.read()
                    elif key in values:
                        raise RequestError(400, f"option {key!r} given twice")
                    else:
                        values[key] = value
            if data is None:
                raise RequestError(400, "no image: the multipart form needs a file field 'image'")
        elif ctype in ("application/x-www-form-urlencoded", "text/plain", "application/json") or (
                ctype and ctype not in RAW_TYPES and not ctype.startswith("image/")):
            raise RequestError(415, f"content type {ctype!r}: send the image as the body (image/png, image/jpeg, "
                                    "image/webp, application/octet-stream) or as multipart/form-data field 'image'")
        else:
            data = await request.body()
            if not data:
                raise RequestError(400, "no image: send it as the request body or as the multipart field 'image'")
        options = RestoreOptions.parse(values, config)
        outcome = await engine.restore_admitted(data, options)
        if options.format == "json":
            return JSONResponse(outcome.report())
        return Response(outcome.encoded, media_type=outcome.media_type,
                        headers={"X-Faces": str(len(outcome.faces))})

    app.add_middleware(GuardMiddleware, config=config, engine=engine)
    return app
