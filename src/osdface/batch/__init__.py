"""Restore whole photo collections: input planning, streaming reports and engines (issue 15).

* :mod:`osdface.batch.inputs` — which photos, where each result goes (mirrored trees, input lists, shards);
* :mod:`osdface.batch.report` — the JSON-lines report, appended per photo and resumable;
* :mod:`osdface.batch.stages` — prepare / model / write of one photo, shared by the engines;
* :mod:`osdface.batch.local` — one process, the file work overlapping the model;
* :mod:`osdface.batch.ray_engine` — Ray Data across GPUs and machines (extra ``osdface[scale]``).

Above the face layer (it composes :class:`~osdface.face.FaceRestorer`'s stages), below the programs.
Submodules import lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "InputPhoto": "osdface.batch.inputs",
    "collect_inputs": "osdface.batch.inputs",
    "read_input_list": "osdface.batch.inputs",
    "parse_shard": "osdface.batch.inputs",
    "select_shard": "osdface.batch.inputs",
    "JsonlReport": "osdface.batch.report",
    "PhotoJob": "osdface.batch.stages",
    "WriteOptions": "osdface.batch.stages",
    "restore_collection": "osdface.batch.local",
    "RunStats": "osdface.batch.local",
    "RayStages": "osdface.batch.ray_engine",
    "restore_collection_ray": "osdface.batch.ray_engine",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'osdface.batch' has no attribute {name!r}")
