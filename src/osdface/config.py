"""Configuration machinery shared by every layer that reads settings (docs: architecture §4.5).

Experiment settings (training experiments, degradation configs) are YAML parsed into frozen,
typed dataclasses. This module holds the generic part, below ``osdface.data`` and
``osdface.training`` so that both use it without the data layer importing the training layer
(``osdface.training.config`` re-exports every name):

* :class:`ConfigError`, the one error of an invalid configuration (an :class:`~osdface.errors.OSDFaceError`
  and a ``ValueError``); ``osdface.training.config.ConfigError`` is the same class;
* :func:`from_dict` builds any (nested) frozen dataclass from a mapping; unknown keys raise
  (with a "did you mean" hint), types are checked (``int``, ``float`` — ints accepted,
  ``int | float`` — an int stays an int, ``bool`` — strict, ``str``, ``Literal``, ``Optional``,
  ``tuple[...]``, ``list[...]``, ``dict[str, ...]``, nested dataclasses);
* a section class may accept a shorthand: when it defines a classmethod
  ``config_input(value, key) -> Mapping`` (e.g. a preset name → that preset's fields), :func:`from_dict`
  and :func:`apply_overrides` pass it the raw value first;
* :func:`apply_overrides` applies ``a.b.c=value`` strings (values parsed as YAML);
* :func:`load_config` = YAML file + overrides → dataclass; :func:`to_dict`/:func:`dump_yaml`
  write the resolved config back;
* :class:`Bound` and :func:`check_bounds`: plausible ranges of fields, from a table of bounds by
  dotted key that each layer owns (``osdface.training.config.BOUNDS``,
  ``osdface.data.degradation.DEGRADATION_BOUNDS``); sections call it from ``__post_init__``.

An error raised while building a nested section names the full dotted key: a section that checks
itself with keys relative to itself (``blur_sigma``) has them rooted where it sits
(``data.degradation.blur_sigma``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import OSDFaceError
from .utils.io import yaml_error_reason

T = TypeVar("T")

__all__ = [
    "Bound",
    "ConfigError",
    "ConfigFileNotFoundError",
    "apply_overrides",
    "check_bounds",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "to_dict",
]


class ConfigError(OSDFaceError, ValueError):
    """An invalid configuration (unknown key, wrong type, bad override); the message names the key.

    Attributes:
        key: the dotted config key at fault, where known (``None`` otherwise).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A config file named on the command line (or recorded in a checkpoint) does not exist."""


# ------------------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class Bound:
    """Plausible range of one config field: ``lo ≤ value ≤ hi`` (each optional; ``lo_open``: ``value > lo``).

    For a list field the range applies to every item, and ``min_items``/``max_items`` bound its length.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    min_items: int | None = None
    max_items: int | None = None


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 400-digit number stays readable in one line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_number(key: str, value: Any, bound: Bound, table: str, err_key: str | None = None) -> None:
    """Check one number against ``bound`` (from the bounds table named ``table``).

    Raises:
        ConfigError: naming ``key``, the value and the bound; its ``key`` attribute is ``err_key`` or ``key``.
    """
    err_key = err_key or key
    if bound.lo is not None and (value <= bound.lo if bound.lo_open else value < bound.lo):
        rel = ">" if bound.lo_open else "≥"
        raise ConfigError(f"{key} must be {rel} {_fmt(bound.lo)}, got {_short(value)} (bound in {table})",
                          key=err_key)
    if bound.hi is not None and value > bound.hi:
        raise ConfigError(f"{key} must be ≤ {_fmt(bound.hi)}, got {_short(value)} (bound in {table})", key=err_key)


def check_bounds(section: Any, prefix: str, bounds: Mapping[str, Bound], table: str) -> None:
    """Check the plain (non-section) fields of the config ``section`` found at ``prefix`` against ``bounds``.

    Args:
        section: a dataclass instance.
        prefix: its dotted key (``""``: keys relative to the section, rooted by :func:`from_dict`).
        bounds: bounds by dotted key (``prefix.field``).
        table: where ``bounds`` is defined, for the message.

    Raises:
        ConfigError: naming the field, the value and the bound.
    """
    for f in dataclasses.fields(section):
        key = f"{prefix}.{f.name}" if prefix else f.name
        bound = bounds.get(key)
        value = getattr(section, f.name)
        if bound is None or value is None or dataclasses.is_dataclass(value):
            continue
        if isinstance(value, (list, tuple)):
            if bound.min_items is not None and len(value) < bound.min_items:
                raise ConfigError(f"{key} needs at least {bound.min_items} item(s), got {len(value)}", key=key)
            if bound.max_items is not None and len(value) > bound.max_items:
                raise ConfigError(f"{key} may have at most {bound.max_items} items, got {len(value)} (bound in "
                                  f"{table})", key=key)
            for i, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    check_number(f"{key}[{i}]", item, bound, table)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            check_number(key, value, bound, table)


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
        if not isinstance(value, Mapping) and not hasattr(tp, INPUT_HOOK):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {type(value).__name__}", key=key)
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if {a for a in args if a is not type(None)} == {int, float}:  # a number; an int stays an int
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return _convert(value, float, key)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message, plus that null is allowed
            try:
                return _convert(value, options[0], key)
            except ConfigError as e:
                if e.key != key:
                    raise
                raise ConfigError(f"{e} (or null)", key=key) from None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)} ({'; '.join(errors)})", key=key)
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads no/off/yes/on as booleans: map back to a matching string option
            spelled = [a for a in args if a.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))]
            if len(spelled) == 1:
                return spelled[0]
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}", key=key)
    if origin in (tuple, list, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}", key=key)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}", key=key)
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}", key=key)
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_short(value)}", key=key)
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {_short(value)}", key=key)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_short(value)}", key=key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}", key=key)
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}", key=key)


#: Name of the optional classmethod ``(value, key) -> Mapping`` of a section class that turns a
#: shorthand written for the section (e.g. a preset name) into the mapping of its fields.
INPUT_HOOK = "config_input"


def _rooted(e: ConfigError, prefix: str) -> ConfigError:
    """``e`` with a key relative to the section at ``prefix`` made absolute (``e`` itself otherwise)."""
    if not prefix or e.key is None or e.key == prefix or e.key.startswith((prefix + ".", prefix + "[")):
        return e
    msg = str(e)
    msg = f"{prefix}.{msg}" if msg.startswith(e.key) else f"{prefix}: {msg}"
    return ConfigError(msg, key=f"{prefix}.{e.key}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; missing keys take the dataclass defaults.

    ``data`` is a mapping (or ``None``), or any shorthand the class's ``config_input`` accepts.

    Raises:
        ConfigError: unknown keys (with suggestions), wrong types, or invalid values; the key is
            the full dotted key below ``prefix``.
    """
    try:
        return _from_dict(cls, data, prefix)
    except ConfigError as e:
        rooted = _rooted(e, prefix)
        if rooted is e:
            raise
        raise rooted from None


def _from_dict(cls: type[T], data: Any, prefix: str) -> T:
    hook = getattr(cls, INPUT_HOOK, None)
    if hook is not None:
        data = hook(data, prefix)
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
        raise ConfigError(f"unknown config key {where!r}{hint}; valid keys here: {', '.join(fields)}", key=where)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}", key=prefix or None) from None


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
        raise ConfigError(f"override {item!r}: cannot parse value ({yaml_error_reason(e)})") from None
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
                hook = getattr(tp, INPUT_HOOK, None)
                if hook is not None and child is not None:  # a shorthand (preset name) → its fields
                    child = node[part] = hook(child, where)
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

    An error in a value that came from the file (not from an override) names the file.

    Raises:
        ConfigFileNotFoundError: ``path`` does not exist (a ``FileNotFoundError`` and a ``ConfigError``).
        ConfigError: unreadable file, unknown keys, type errors, out-of-bounds values, malformed overrides
            (the message names the key).
    """
    data: Mapping[str, Any] = {}
    p = None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigFileNotFoundError(f"config file {p} not found", key=None)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({yaml_error_reason(e)})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config file ({e})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping")
    merged = apply_overrides(cls, data, overrides)
    try:
        return from_dict(cls, merged)
    except ConfigError as e:
        # an override at, under or above the failing key (a section-level check) → not the file's fault
        overridden = [".".join(parse_override(item)[0]) for item in overrides]
        from_override = e.key is not None and any(
            e.key == k or e.key.startswith((k + ".", k + "[")) or k.startswith(e.key + ".") for k in overridden)
        if p is None or from_override:
            raise
        raise ConfigError(f"{p}: {e}", key=e.key) from None
