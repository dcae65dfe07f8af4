"""osdface: one-step diffusion face restoration (OSDFace, CVPR 2025).

The public API is imported lazily so that ``import osdface`` and ``osdface --version`` stay fast:
torch and diffusers are only imported when a model class is first touched.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_LAZY = {
    "OSDFacePipeline": "osdface.pipelines.pipeline_osdface",
    "OSDFacePipelineOutput": "osdface.pipelines.output",
    "VisualPromptEncoder": "osdface.models.prompt_encoder",
    "PromptAdapter": "osdface.models.prompt_encoder",
    "WeightsNotFoundError": "osdface.weights",
    "FaceRestorer": "osdface.face.restorer",
    "read_image": "osdface.image",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'osdface' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
