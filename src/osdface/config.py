"""Configuration errors shared by every layer that reads settings (training experiments, degradation configs).

:class:`ConfigError` lives here, below ``osdface.data`` and ``osdface.training``, so that both can
raise it without the data layer importing the training layer; ``osdface.training.config.ConfigError``
is the same class.
"""

from __future__ import annotations

from .errors import OSDFaceError


class ConfigError(OSDFaceError, ValueError):
    """An invalid configuration (unknown key, wrong type, bad override); the message names the key.

    Attributes:
        key: the dotted config key at fault, where known (``None`` otherwise).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


__all__ = ["ConfigError"]
