"""``osdface serve``: the HTTP API (docs/serving.md). Also the flags and the loader ``osdface demo`` shares.

The models are loaded with the ``restore`` loaders (:func:`~osdface.cli.common.load_pipeline_from_args`,
one pipeline per replica; :func:`~osdface.cli.restore_photos.build_face_models` per CPU thread) before
the port opens, so a bad model folder or flag ends with one line and exit 2. The web stack is
imported inside :func:`run` (``pip install osdface[serve]``).
"""

from __future__ import annotations

import argparse
import math
import os

from ..errors import InvalidSettingError
from .common import CLIError, add_model_args

#: the environment variable read when --api-key is not given
API_KEY_ENV = "OSDFACE_API_KEY"


def add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    """Model, face-layer, batching and limit flags shared by ``serve`` and ``demo``."""
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    g.add_argument("--max-batch", type=int, default=8, metavar="N", help="most faces per model call (1 = no batching)")
    g.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS",
                   help="how long a face may wait for others to fill a batch (default 20)")
    g.add_argument("--replicas", type=int, default=1, metavar="N", help="model workers, each with its own model copy")
    g.add_argument("--cpu-workers", type=int, default=2, metavar="N",
                   help="threads for decoding, detection, paste-back and encoding (default 2)")
    g.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="largest request body (default 20)")
    g.add_argument("--max-pixels", type=float, default=40.0, metavar="MP",
                   help="largest input image in megapixels, checked before decoding (default 40)")
    g.add_argument("--max-output-pixels", type=float, default=100.0, metavar="MP",
                   help="largest output (input × upscale²) in megapixels (default 100)")
    g.add_argument("--formats", default="png,jpeg,webp", help="accepted input formats (default png,jpeg,webp)")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per-request deadline, 504 after (default 60)")
    g.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests admitted at once; one more is answered 503 + Retry-After (default 32)")
    g.add_argument("--max-faces", type=int, default=16, metavar="N", help="most faces restored per photo (default 16)")
    g.add_argument("--max-upscale", type=float, default=4.0, metavar="N", help="largest upscale a request may ask for")
    g.add_argument("--api-key", metavar="KEY",
                   help=f"require this key on every route but /healthz and /readyz (default: ${API_KEY_ENV}; "
                        "prefer the variable: a flag shows in the process list)")
    f = p.add_argument_group("face layer (as osdface restore)")
    f.add_argument("--detector", default="yunet",
                   help="face detector: yunet (default, offline), retinaface_resnet50, retinaface_mobile0.25")
    f.add_argument("--detector-weights", metavar="FILE", help="detector weight file (RetinaFace .pth, YuNet .onnx)")
    f.add_argument("--det-threshold", type=float, metavar="T", help="detection confidence threshold")
    f.add_argument("--nms-threshold", type=float, metavar="T", help="IoU threshold of the detector's NMS")
    f.add_argument("--parsing-model", metavar="FILE", help="facexlib parsing_parsenet.pth for parsing-based paste masks")
    f.add_argument("--bg-upsampler", default="lanczos", metavar="NAME|FILE",
                   help="background for upscale > 1: lanczos (default), bicubic, ..., or a Real-ESRGAN RRDBNet .pth")
    f.add_argument("--bg-tile", type=int, default=400, metavar="PX", help="tile size of a background model (0 = none)")
    f.add_argument("--no-identity", dest="identity", action="store_false",
                   help="skip the per-face identity check (SFace cosine, input vs restored face, in the format=json "
                        "report; on by default, as in osdface restore)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API: POST /v1/restore, with faces of concurrent requests batched together",
        description="Serve restoration over HTTP (docs/serving.md): POST /v1/restore (image body or multipart "
        "field 'image'; options as query parameters or fields; format=json for the face report), GET /healthz, "
        "/readyz, /metrics. Listens on 127.0.0.1 unless --host says otherwise.",
    )
    add_server_args(p, port=8000)
    p.set_defaults(run=run)


def _scaled(name: str, value: float, scale: float) -> int:
    """``value × scale`` as an int; NaN or infinity is a setting error (one line), not a ValueError."""
    if not math.isfinite(value):
        raise InvalidSettingError(f"{name} must be a finite number, got {value}")
    return int(value * scale)


def config_from_args(args):
    """:class:`~osdface.serve.config.ServeConfig` from the flags (bounds checked there)."""
    from ..serve.config import ServeConfig

    if getattr(args, "latent", "mode") != "mode":
        raise CLIError("the service restores with the deterministic latent mode only")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    formats = tuple(f.strip().upper().replace("JPG", "JPEG") for f in args.formats.split(",") if f.strip())
    return ServeConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        replicas=args.replicas, cpu_workers=args.cpu_workers,
        max_upload_bytes=_scaled("max_upload_bytes", args.max_upload_mb, 1024 * 1024),
        max_pixels=_scaled("max_pixels", args.max_pixels, 1e6),
        max_output_pixels=_scaled("max_output_pixels", args.max_output_pixels, 1e6), formats=formats,
        request_timeout_s=args.timeout, max_queue=args.max_queue, max_faces=args.max_faces,
        max_upscale=args.max_upscale, api_key=key,
    )


def load_engine(args, config):
    """The :class:`~osdface.serve.engine.RestoreEngine` of ``args``: the face models first (a refused file costs
    no model load), then one pipeline per replica through the ``restore`` loader.

    Each CPU thread gets its own face models, and its own SFace identity scorer (OpenCV's recogniser
    object is not shared between threads) unless ``--no-identity``."""
    from ..serve.engine import RestoreEngine
    from .common import load_pipeline_from_args
    from .restore_photos import build_face_models, face_layer_device

    device = face_layer_device(args)

    def build() -> dict:
        models = build_face_models(args, device)
        if getattr(args, "identity", True):
            from ..face.identity import IdentityScorer

            models["identity"] = IdentityScorer()
        return models

    first = [build()]  # checked now; handed to the first CPU thread

    def face_models() -> dict:
        # CPU threads call this concurrently: pop and catch (a check before the pop could lose the race)
        try:
            return first.pop()
        except IndexError:
            return build()

    pipelines = [load_pipeline_from_args(args) for _ in range(config.replicas)]
    return RestoreEngine(config, pipelines, face_models)


def require_serve_extra() -> None:
    """One line naming the extra when the web stack is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "multipart")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"osdface serve needs {', '.join(missing)}: pip install 'osdface[serve]'")


def run(args) -> int:
    require_serve_extra()
    import uvicorn

    from ..serve.app import create_app

    config = config_from_args(args)
    engine = load_engine(args, config)
    app = create_app(engine)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        import logging

        logging.getLogger("osdface.serve").warning("listening on %s without an API key", config.host)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=10,
                server_header=False)
    return 0
