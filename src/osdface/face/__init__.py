"""Face application layer: detection → alignment → one-step restoration → soft-mask paste-back.

``FaceRestorer(pipeline, detector="yunet").restore(photo)`` is the entry point; the pieces
(detectors, alignment, paste-back, parsing, background upsamplers, video) are usable on their own.
Submodules import lazily so that ``import osdface.face`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FaceRestorer": "osdface.face.restorer",
    "PreparedPhoto": "osdface.face.restorer",
    "align_faces": "osdface.face.restorer",
    "Detection": "osdface.face.types",
    "FaceCrop": "osdface.face.types",
    "RestoreResult": "osdface.face.types",
    "FaceDetector": "osdface.face.detection",
    "DETECTORS": "osdface.face.detection",
    "create_detector": "osdface.face.detection",
    "list_detectors": "osdface.face.detection",
    "select_faces": "osdface.face.detection",
    "restore_video": "osdface.face.video",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'osdface.face' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
