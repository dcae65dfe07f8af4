"""``osdface env``: versions, devices and optional packages, for bug reports."""

from __future__ import annotations

import importlib.metadata as md
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print versions, devices and optional extras")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from .._version import __version__
    from ..weights import osdface_home

    print(f"osdface {__version__}  python {platform.python_version()}  {platform.platform()}")
    for pkg in ("torch", "diffusers", "peft", "safetensors", "accelerate", "opencv-python-headless", "numpy", "pillow",
                "fastapi", "uvicorn", "gradio"):  # the last three: the serve extra
        try:
            print(f"  {pkg:24s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:24s} (not installed)")
    print(f"  cuda available: {torch.cuda.is_available()}  devices: {torch.cuda.device_count()}")
    mps = getattr(torch.backends, "mps", None)
    print(f"  mps available: {bool(mps and mps.is_available())}")
    print(f"  OSDFACE_HOME: {osdface_home()}")
    return 0
