"""The package's error types: every error a user can cause is an :class:`OSDFaceError`.

The command line turns any :class:`OSDFaceError` into one line on stderr (``osdface: error: ...``)
and exit code 2, in one place (:func:`osdface.cli.main`); nothing else needs catching there.
A message names the file (or config field, or option) and says what is wrong with it. Each
subclass also derives from the builtin exception that callers caught before it existed
(``ValueError``, ``FileNotFoundError``, ...), so existing ``except`` clauses keep working.

Kept free of heavy imports: the CLI imports it before torch.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: how a third-party error
    (engines, parsers, file readers raise multi-line messages) is quoted in a one-line osdface message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


class OSDFaceError(Exception):
    """Base of every domain error: bad input, missing or malformed files, impossible settings."""


class ModelFileError(OSDFaceError, ValueError):
    """A weight file, checkpoint or model-folder config is unreadable, malformed or implausible.

    The message names the file (and the key or field where known) and the reason.
    """


class WeightsNotFoundError(OSDFaceError, FileNotFoundError):
    """A weight file or folder is missing; the message says what to get and where to put it."""


class NonFiniteOutputError(OSDFaceError, RuntimeError):
    """A model produced NaN or Inf values: its weights (named in the message) are broken."""


class DeviceError(OSDFaceError, RuntimeError):
    """The requested device (``cuda``, ``mps``, ...) is not available here."""


class OutputPathError(OSDFaceError, ValueError):
    """An output path would overwrite an input, another output, or escape the output folder."""


class InvalidSettingError(OSDFaceError, ValueError):
    """An option or setting has an impossible value (an unknown name, a combination that cannot work)."""
