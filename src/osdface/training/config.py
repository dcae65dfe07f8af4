"""Experiment configuration: YAML → frozen, typed dataclasses; dotted ``--set`` overrides.

Generic machinery shared by both training stages:

* :func:`from_dict` builds any (nested) frozen dataclass from a mapping; unknown keys raise
  (with a "did you mean" hint), types are checked (``int``, ``float`` — ints accepted,
  ``bool`` — strict, ``str``, ``Literal``, ``Optional``, ``tuple[...]``, ``list[...]``,
  ``dict[str, ...]``, nested dataclasses);
* :func:`apply_overrides` applies ``a.b.c=value`` strings (values parsed as YAML);
* :func:`load_config` = YAML file + overrides → dataclass; :func:`to_dict`/:func:`dump_yaml`
  write the resolved config back (saved into the run dir and every checkpoint).

Defaults live in the dataclasses only. The shared sections (:class:`TrainConfig`,
:class:`DataConfig`) are here; stage-specific experiment classes compose them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ..errors import OSDFaceError

T = TypeVar("T")


class ConfigError(OSDFaceError, ValueError):
    """An invalid configuration (unknown key, wrong type, bad override); the message names the key."""


# ----------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Training data: aligned HQ faces, LQ synthesised on the fly (``osdface.data``).

    Attributes:
        size: face side in pixels.
        hflip: random horizontal flips.
        degradation: preset name (``daefr``, ``osediff-face``) or a degradation YAML path.
        num_workers: DataLoader workers per process.
        val_images: validation images taken from the front of the validation folders (or of
            the training set when no validation folder is given).
    """

    size: int = 512
    hflip: bool = True
    degradation: str = "daefr"
    num_workers: int = 4
    val_images: int = 8


@dataclass(frozen=True)
class TrainConfig:
    """The generic loop: steps, batching, precision, logging, checkpoints, validation.

    A *step* is one optimiser update (``grad_accum`` micro-batches per process).

    Attributes:
        max_steps: total optimiser steps.
        batch_size: micro-batch size per process.
        grad_accum: micro-batches per step.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (accelerate autocast; fp16 adds loss scaling).
        seed: seeds model init, data order (per epoch) and degradations.
        log_every: steps between logged averages (TensorBoard + ``log.jsonl``).
        ckpt_every: steps between checkpoints (and one at the end).
        keep_last: checkpoints kept (older ones are deleted; ``0`` keeps all).
        val_every: steps between validations (``0``: only at the end).
        log_images: validation images written to TensorBoard.
    """

    max_steps: int = 100_000
    batch_size: int = 2
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    val_every: int = 2000
    log_images: int = 4

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("keep_last", "val_every", "log_images", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be ≥ 0, got {getattr(self, name)}")


# ------------------------------------------------------------------------------- conversion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise :class:`ConfigError` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)} ({'; '.join(errors)})")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads no/off/yes/on as booleans: map back to a matching string option
            spelled = [a for a in args if a.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))]
            if len(spelled) == 1:
                return spelled[0]
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (tuple, list, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; missing keys take the dataclass defaults.

    Raises:
        ConfigError: unknown keys (with suggestions), wrong types, or invalid values.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"{prefix}.{k}" if prefix else str(k)
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {where!r}{hint}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass → plain dict/list/scalars (tuples become lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML (keys in declaration order)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` → ``(["a", "b"], parsed value)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {item!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value ({e})") from None
    return path, value


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config mapping, checking each key path against ``cls``.

    Returns a new nested dict; the typed check happens in :func:`from_dict`.
    """
    out = _deepcopy_mapping(data)
    for item in overrides:
        path, value = parse_override(item)
        node, tp = out, cls
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            fields = {f.name: f for f in dataclasses.fields(tp)}
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"override {item!r}: unknown config key {where!r}{hint}; "
                                  f"valid keys here: {', '.join(fields)}")
            if i == len(path) - 1:
                node[part] = value
            else:
                tp = _section_type(typing.get_type_hints(tp)[part])
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {item!r}: {where!r} is not a section")
                child = node.get(part)
                if not isinstance(child, dict):
                    child = _deepcopy_mapping(child) if isinstance(child, Mapping) else {}
                    node[part] = child
                node = child
    return out


def _section_type(tp: Any) -> Any:
    """The dataclass inside ``X`` or ``Optional[X]``."""
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return tp


def _deepcopy_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_mapping(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML experiment file (optional), apply ``overrides`` and build ``cls``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown keys, type errors, malformed overrides (the message names the key).
    """
    data: Mapping[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping")
    return from_dict(cls, apply_overrides(cls, data, overrides))
