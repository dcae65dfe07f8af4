"""Data layer: seeded synthetic degradations (:mod:`.degradation`), datasets (:mod:`.datasets`)
and synthetic test-set building (:mod:`.testset`).

Names are imported lazily so that ``import osdface.data.degradation`` (NumPy/OpenCV only) does not
pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DegradationConfig": "degradation",
    "Degrader": "degradation",
    "PRESETS": "degradation",
    "image_seed": "degradation",
    "load_degradation_config": "degradation",
    "resolve_degradation": "degradation",
    "DegradedFaceDataset": "datasets",
    "PairedFolderDataset": "datasets",
    "list_images": "files",
    "degrade_folder": "testset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
