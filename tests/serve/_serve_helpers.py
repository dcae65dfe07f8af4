"""Plain helpers of the service tests (imported as ``_serve_helpers``; pytest puts this folder on sys.path):
engines loaded through the CLI loader and a live uvicorn server on 127.0.0.1 with an ephemeral port (the real
HTTP stack, not a test client)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: the bundled sample photo (restore-sample.sh); YuNet finds one face in it
SAMPLE = REPO / "assets" / "astronaut.jpg"
API_KEY = "test-key-0123456789"


def model_args(model_dir, *extra: str):
    """The ``osdface serve`` namespace for ``model_dir`` (CPU), parsed by the real parser."""
    from osdface.cli import build_parser

    return build_parser().parse_args(["serve", "--model", str(model_dir), "--device", "cpu", *extra])


def load_test_engine(model_dir, **config):
    """A :class:`RestoreEngine` through the CLI loader, with ``ServeConfig(**config)``."""
    from osdface.cli.serve import load_engine
    from osdface.serve.config import ServeConfig

    cfg = ServeConfig(**config)
    return load_engine(model_args(model_dir, "--replicas", str(cfg.replicas)), cfg)


class LiveServer:
    """uvicorn serving ``app`` in a thread on 127.0.0.1:<ephemeral>; ``url`` once started; :meth:`stop` ends it."""

    def __init__(self, app) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(600):  # up to ~60 s on a loaded machine; not a timing assertion
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.1)
        if not self.server.started:
            raise RuntimeError("the test server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(engine) -> LiveServer:
    from osdface.serve.app import create_app

    return LiveServer(create_app(engine))


def metric_value(text: str, name: str) -> float:
    """One sample's value from Prometheus exposition text (``name`` with its labels, as printed)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
