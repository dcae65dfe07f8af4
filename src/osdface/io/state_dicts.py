"""State dicts of foreign checkpoints: unwrap, strip prefixes, check strictly, load.

The one implementation of what each model-reading module used to repeat: released files wrap
their tensors in containers (BasicSR ``params``/``params_ema``, Lightning ``state_dict``, pyiqa,
IIGROUP ``model``/``net``) and carry DataParallel's ``module.`` prefix; before a ``load_state_dict``
the keys and shapes are compared against the model so that a wrong file is refused with a message
that names it, rather than a torch ``RuntimeError`` listing hundreds of keys.

Pure functions on dicts of tensors; nothing here reads files (see :mod:`osdface.safe_load`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ModelFileError

#: container keys released checkpoints wrap their tensors in (BasicSR, Lightning, pyiqa, IIGROUP, ...)
CONTAINER_KEYS = ("state_dict", "params_ema", "params", "model", "net")

#: DataParallel / DistributedDataParallel's key prefix
DATA_PARALLEL_PREFIX = "module."

#: how many keys of each kind an error message names
SHOWN_KEYS = 5


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``sd`` with ``prefix`` removed from the keys that start with it (other keys unchanged; order kept)."""
    n = len(prefix)
    return {(k[n:] if isinstance(k, str) and k.startswith(prefix) else k): v for k, v in sd.items()}


def unwrap_state_dict(obj, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict of a released checkpoint.

    Unwraps (nested) :data:`CONTAINER_KEYS` containers while the dict holds no tensor itself, then
    strips DataParallel ``module.`` prefixes.

    Args:
        obj: what :func:`osdface.safe_load.load_torch_checkpoint` (or safetensors) returned.
        source: the file, for the message.

    Raises:
        ModelFileError: naming ``source`` when no non-empty dict holding tensors is found.
    """
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not any(torch.is_tensor(v) for v in obj.values()):
        raise ModelFileError(f"{source}: no state dict of tensors found in the file")
    return strip_prefix(obj, DATA_PARALLEL_PREFIX)


def _shape(v) -> tuple[int, ...] | None:
    if torch.is_tensor(v):
        return tuple(v.shape)
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(v)
    return None


def _named(kind: str, keys: list[str]) -> str:
    return f"{len(keys)} {kind} {keys[:SHOWN_KEYS]}{' ...' if len(keys) > SHOWN_KEYS else ''}"


def check_state_dict(got: Mapping, expected: Mapping, source: str | os.PathLike, what: str,
                     may_be_missing: Callable[[str], bool] = lambda key: False, hint: str = "") -> None:
    """Keys and shapes of ``got`` against ``expected``.

    Args:
        got: the file's state dict (values should be tensors; anything else counts as a wrong shape).
        expected: a model's state dict (tensors, may be on ``meta``) or a mapping key → shape.
        source: the file, named first in the message.
        what: what the file should be, e.g. ``"a MUSIQ (KonIQ) checkpoint"``; the message reads
            ``"{source}: not {what}: ..."``.
        may_be_missing: expected keys that may be absent from ``got`` (e.g. BatchNorm
            ``num_batches_tracked`` of old files, layers a metric does not use).
        hint: appended to the message (e.g. how to get a correct file).

    Raises:
        ModelFileError: naming ``source``, ``what`` and, with their counts, the first
            :data:`SHOWN_KEYS` (sorted) missing, unexpected and wrongly shaped keys.
    """
    missing = sorted(k for k in expected if k not in got and not may_be_missing(k))
    unexpected = sorted(str(k) for k in got if k not in expected)
    wrong = sorted(k for k in got if k in expected
                   and (not torch.is_tensor(got[k]) or _shape(got[k]) != _shape(expected[k])))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(_named("missing", missing))
    if unexpected:
        parts.append(_named("unexpected", unexpected))
    if wrong:
        shown = [f"{k} {_shape(got[k]) if torch.is_tensor(got[k]) else type(got[k]).__name__} != "
                 f"{_shape(expected[k])}" for k in wrong]
        parts.append(_named("with a wrong shape", shown))
    raise ModelFileError(f"{source}: not {what}: {'; '.join(parts)}{hint}")


def load_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike, what: str,
                 may_be_missing: Callable[[str], bool] = lambda key: False, hint: str = "") -> nn.Module:
    """:func:`check_state_dict` against ``model.state_dict()``, then ``load_state_dict(strict=True)``.

    Keys allowed by ``may_be_missing`` and absent from ``sd`` keep the model's own values.

    Returns:
        ``model``.

    Raises:
        ModelFileError: see :func:`check_state_dict`.
    """
    own = model.state_dict()
    check_state_dict(sd, own, source, what, may_be_missing, hint)
    model.load_state_dict({**{k: v for k, v in own.items() if k not in sd}, **sd}, strict=True)
    return model


__all__ = ["CONTAINER_KEYS", "DATA_PARALLEL_PREFIX", "check_state_dict", "load_checked", "strip_prefix",
           "unwrap_state_dict"]
