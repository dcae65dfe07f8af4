"""``osdface demo``: the Gradio web demo (docs/serving.md) over the same engine as ``osdface serve``."""

from __future__ import annotations

from .common import CLIError


def add_parser(sub) -> None:
    from .serve import add_server_args

    p = sub.add_parser(
        "demo",
        help="web demo (Gradio): upload a photo, before/after, face crops, download",
        description="A browser demo of restoration on 127.0.0.1 (unless --host): upload, options, before/after "
        "slider, restored face crops and a download. Runs offline. Same model, batching and limit flags as "
        "osdface serve (the API key does not apply).",
    )
    add_server_args(p, port=7860)
    p.set_defaults(run=run)


def run(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise CLIError("osdface demo needs gradio: pip install 'osdface[serve]'")
    from ..serve.demo import build_demo, launch_demo
    from .serve import config_from_args, load_engine

    config = config_from_args(args)
    if config.api_key:
        import logging

        logging.getLogger("osdface.demo").warning("the API key applies to osdface serve, not to the demo: "
                                                  "keep the demo on 127.0.0.1 or behind your own authentication")
    engine = load_engine(args, config)
    demo = build_demo(engine)
    try:
        launch_demo(demo, config.host, config.port, config.max_upload_bytes, block=True)
    finally:
        demo.osdface_downloads.cleanup()
    return 0
