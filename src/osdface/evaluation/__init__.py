"""Evaluation: the paper's metrics (docs/method.md §8) behind one interface, folder evaluation and reports.

Heavy modules are imported lazily; ``import osdface.evaluation`` is cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "create_metric": "osdface.evaluation.metrics",
    "list_metrics": "osdface.evaluation.metrics",
    "Metric": "osdface.evaluation.metrics",
    "evaluate_folder": "osdface.evaluation.folder",
    "EvalReport": "osdface.evaluation.report",
    "install_weights": "osdface.evaluation.weights",
    "metrics_weights_dir": "osdface.evaluation.weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'osdface.evaluation' has no attribute {name!r}")
