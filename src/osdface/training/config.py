"""Experiment configuration: YAML → frozen, typed dataclasses; dotted ``--set`` overrides.

Generic machinery shared by both training stages:

* :func:`from_dict` builds any (nested) frozen dataclass from a mapping; unknown keys raise
  (with a "did you mean" hint), types are checked (``int``, ``float`` — ints accepted,
  ``bool`` — strict, ``str``, ``Literal``, ``Optional``, ``tuple[...]``, ``list[...]``,
  ``dict[str, ...]``, nested dataclasses);
* :func:`apply_overrides` applies ``a.b.c=value`` strings (values parsed as YAML);
* :func:`load_config` = YAML file + overrides → dataclass; :func:`to_dict`/:func:`dump_yaml`
  write the resolved config back (saved into the run dir and every checkpoint);
* :data:`BOUNDS`, the one table of plausible ranges for sizes, counts and weights (a typo such
  as ``model.vqgan.ch=100000`` is a :class:`ConfigError` naming the field, value and bound, not
  an out-of-memory crash); each section checks its fields against it with :func:`check_bounds`.

Defaults live in the dataclasses only. The shared sections (:class:`TrainConfig`,
:class:`DataConfig`) are here; stage-specific experiment classes compose them.
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

from ..config import ConfigError  # re-exported: defined below the data and training layers
from ..errors import OSDFaceError
from ..utils.io import yaml_error_reason

T = TypeVar("T")


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


_STEPS = 10**9  # step counts, intervals, milestones
_WEIGHT = Bound(0, 1e6)  # a loss weight
_LR = Bound(0, 10)
_LORA_ALPHA = Bound(0, 1e6, lo_open=True)

#: The one table of bounds, by dotted config key (both stages). Generous: every shipped config
#: (``configs/*.yaml``) is far inside, while values that would only end in an allocator failure or a
#: meaningless run (negative weights, a 100000-channel VQ-GAN, batch 10**6) are refused up front.
BOUNDS: dict[str, Bound] = {
    # train (shared)
    "train.max_steps": Bound(1, _STEPS),
    "train.batch_size": Bound(1, 1024),
    "train.grad_accum": Bound(1, 4096),
    "train.seed": Bound(0, 2**32 - 1),  # numpy's seed range
    "train.log_every": Bound(1, _STEPS),
    "train.ckpt_every": Bound(1, _STEPS),
    "train.keep_last": Bound(0, 10**6),
    "train.val_every": Bound(0, _STEPS),
    "train.log_images": Bound(0, 1024),
    # data (shared)
    "data.size": Bound(8, 4096),
    "data.num_workers": Bound(0, 256),
    "data.val_images": Bound(0, 100_000),
    # stage 1 (VRE): the VQ autoencoders and PatchGAN (paper: 1024 × 512 dictionary, ch 64 × (1,2,2,2,4,8))
    "model.vqgan.n_embed": Bound(1, 65_536),
    "model.vqgan.embed_dim": Bound(1, 4096),
    "model.vqgan.ch": Bound(1, 1024),
    "model.vqgan.ch_mult": Bound(1, 32, min_items=1, max_items=10),
    "model.vqgan.num_res_blocks": Bound(1, 16),
    "model.vqgan.attn_resolutions": Bound(1, 4096, max_items=16),
    "model.vqgan.dropout": Bound(0, 1),
    "model.vqgan.resolution": Bound(8, 4096),
    "model.vqgan.z_channels": Bound(1, 4096),
    "model.vqgan.head_size": Bound(1, 64),
    "model.vqgan.ch × max(ch_mult)": Bound(1, 8192),  # the widest encoder/decoder layer (paper: 512)
    "model.discriminator.ndf": Bound(1, 1024),
    "model.discriminator.n_layers": Bound(1, 8),
    "model.num_tokens": Bound(1, 4096),
    "loss.l1": _WEIGHT, "loss.lpips": _WEIGHT, "loss.vq": _WEIGHT, "loss.assoc": _WEIGHT,
    "loss.vq_beta": Bound(0, 1000),
    "loss.disc_start": Bound(0, _STEPS),
    "loss.assoc_logit_scale_init": Bound(-50, 50),  # a log scale: exp() must stay finite
    "optim.lr": _LR, "optim.disc_lr": _LR,
    "optim.betas": Bound(0, 1),
    "optim.weight_decay": Bound(0, 10),
    "optim.lr_milestones": Bound(0, _STEPS, max_items=1000),
    "optim.lr_gamma": Bound(0, 1000),
    "optim.grad_clip": Bound(0, 1e9),
    # stage 2 (generator): LoRA, latent discriminator, losses, AdamW (paper: rank 16, t = 399)
    "model.timestep": Bound(0, 999),
    "model.lora.rank": Bound(1, 1024),
    "model.lora.alpha": _LORA_ALPHA,
    "model.lora.targets": Bound(min_items=1, max_items=256),
    "model.discriminator.head_channels": Bound(1, 16_384),
    "model.discriminator.lora_rank": Bound(1, 1024),
    "model.discriminator.lora_alpha": _LORA_ALPHA,
    "model.discriminator.lora_targets": Bound(min_items=1, max_items=256),
    "model.discriminator.t_min": Bound(0, 999),
    "model.discriminator.t_max": Bound(0, 999),
    "loss.mse": _WEIGHT, "loss.ea_dists": _WEIGHT, "loss.identity": _WEIGHT, "loss.gan": _WEIGHT,
    "loss.gan_start": Bound(0, _STEPS),
    "loss.d_every": Bound(1, _STEPS),
    "optim.eps": Bound(0, 1, lo_open=True),
    "optim.warmup_steps": Bound(0, _STEPS),
}


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 400-digit number stays readable in one line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_value(key: str, value: float, section: str) -> None:
    """Check a derived number (``BOUNDS[key]``, e.g. the widest layer) of the config section ``section``.

    Raises:
        ConfigError: naming ``key``, the value and the bound; its ``key`` attribute is ``section``.
    """
    _check_number(key, value, BOUNDS[key], err_key=section)


def _check_number(key: str, value: Any, bound: Bound, err_key: str | None = None) -> None:
    err_key = err_key or key
    if bound.lo is not None and (value <= bound.lo if bound.lo_open else value < bound.lo):
        rel = ">" if bound.lo_open else "≥"
        raise ConfigError(f"{key} must be {rel} {_fmt(bound.lo)}, got {_short(value)} (bound in "
                          "osdface.training.config.BOUNDS)", key=err_key)
    if bound.hi is not None and value > bound.hi:
        raise ConfigError(f"{key} must be ≤ {_fmt(bound.hi)}, got {_short(value)} (bound in "
                          "osdface.training.config.BOUNDS)", key=err_key)


def check_bounds(section: Any, prefix: str) -> None:
    """Check the plain (non-section) fields of the config ``section`` found at ``prefix`` against :data:`BOUNDS`.

    Sections call this from ``__post_init__``, so a config is checked however it is built.

    Raises:
        ConfigError: naming the field, the value and the bound.
    """
    for f in dataclasses.fields(section):
        key = f"{prefix}.{f.name}" if prefix else f.name
        bound = BOUNDS.get(key)
        value = getattr(section, f.name)
        if bound is None or value is None or dataclasses.is_dataclass(value):
            continue
        if isinstance(value, (list, tuple)):
            if bound.min_items is not None and len(value) < bound.min_items:
                raise ConfigError(f"{key} needs at least {bound.min_items} item(s), got {len(value)}", key=key)
            if bound.max_items is not None and len(value) > bound.max_items:
                raise ConfigError(f"{key} may have at most {bound.max_items} items, got {len(value)} (bound in "
                                  "osdface.training.config.BOUNDS)", key=key)
            for i, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    _check_number(f"{key}[{i}]", item, bound)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(key, value, bound)


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

    def __post_init__(self) -> None:
        check_bounds(self, "data")


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
        check_bounds(self, "train")


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
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {type(value).__name__}", key=key)
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


class ConfigFileNotFoundError(OSDFaceError, FileNotFoundError):
    """The experiment file named on the command line (or recorded in a checkpoint) does not exist."""


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML experiment file (optional), apply ``overrides`` and build ``cls``.

    An error in a value that came from the file (not from an override) names the file.

    Raises:
        ConfigFileNotFoundError: ``path`` does not exist (a ``FileNotFoundError`` too).
        ConfigError: unreadable file, unknown keys, type errors, out-of-bounds values, malformed overrides
            (the message names the key).
    """
    data: Mapping[str, Any] = {}
    p = None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigFileNotFoundError(f"config file {p} not found")
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
