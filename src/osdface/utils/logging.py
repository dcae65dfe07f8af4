"""Library logging: modules call :func:`get_logger`; only the CLI configures handlers."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """Return the logger for ``name`` (normally ``__name__``), under the ``osdface`` hierarchy."""
    return logging.getLogger(name if name.startswith("osdface") else f"osdface.{name}")
