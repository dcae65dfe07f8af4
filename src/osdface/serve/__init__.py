"""``osdface serve`` and ``osdface demo``: the HTTP API and the web demo over :class:`~osdface.face.FaceRestorer`.

A program layer beside training and evaluation (docs/serving.md). It composes the restorer's stages
(``prepare`` → ``restore_crops`` → ``finish``) and never reaches into the pipeline:

* :mod:`.config` — :class:`ServeConfig` (server limits, bounded) and :class:`RestoreOptions` (per request);
* :mod:`.batcher` — :class:`FaceBatcher`, the asyncio dynamic batcher that puts faces of concurrent
  requests into one model batch;
* :mod:`.engine` — :class:`RestoreEngine`: decode → detect/align (CPU threads) → batched model
  (one thread per replica) → paste back → encode, with admission control and timeouts;
* :mod:`.app` — the FastAPI application (routes, API key, body limit, Prometheus metrics);
* :mod:`.demo` — the Gradio demo over the same engine.

Only :mod:`.config` is light; the web stack (``pip install osdface[serve]``) is imported by the others.
"""

from __future__ import annotations

from .config import RestoreOptions, ServeConfig

__all__ = ["RestoreOptions", "ServeConfig"]
