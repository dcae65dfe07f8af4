"""Optional dependencies: import one, or explain which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import InvalidSettingError


def require_package(module: str, extra: str, why: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`InvalidSettingError`: "``why`` needs the '``package``' package:
    pip install 'osdface[``extra``]'" (``package`` defaults to ``module``: the pip name when it differs)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidSettingError(
            f"{why} needs the '{package or module}' package: pip install 'osdface[{extra}]'") from None
