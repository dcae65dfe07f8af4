"""Sane bounds for model-folder configs, checked before any network is built.

A model folder (``OSDFacePipeline.save_pretrained`` / ``osdface convert``) carries JSON configs that
decide how much memory the loader allocates and how much compute one face costs. A config with a
UNet channel count of 10⁶ or a pipeline resolution of 3000 must be refused with a message naming
the file, the field, the value and the bound, *before* diffusers or our classes allocate anything.

:data:`LIMITS` is the one table of per-field bounds (component → field → :class:`Bound`); the
real SD 2.1-base UNet/VAE/scheduler, the released VRE and adapter, and the tiny test models are
well inside it. :func:`check_model_folder_configs` also checks the configs against each other
(latent channels, cross-attention width, token width, resolution, timestep) and a few derived
sizes (widest VRE channel, VRE distance matrix, VAE activation per face).

Import-light on purpose: only the standard library and :mod:`osdface.errors` at import time (torch
is imported lazily by :func:`first_nonfinite_key`), so training code and the CLI can reuse it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFileError


@dataclass(frozen=True)
class Bound:
    """Closed range ``[low, high]`` of a config field; ``kind`` is ``int`` or ``float``."""

    low: float
    high: float
    kind: type = int

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


#: Per-field bounds, component → field → bound. Reference values in comments: SD 2.1-base
#: (UNet, VAE, scheduler) and the released OSDFace VRE / adapter. A list-valued field (channels
#: per level, ...) is checked element-wise; its length is bounded by the ``*_levels`` entries.
LIMITS: dict[str, dict[str, Bound]] = {
    "unet": {
        "block_out_channels": Bound(1, 4096),  # 320, 640, 1280, 1280
        "levels": Bound(1, 6),  # 4 down / up blocks
        "layers_per_block": Bound(1, 8),  # 2
        "attention_head_dim": Bound(1, 1024),  # 5, 10, 20, 20 (heads, in SD 2.x configs)
        "num_attention_heads": Bound(1, 1024),  # null
        "transformer_layers_per_block": Bound(1, 16),  # 1
        "cross_attention_dim": Bound(1, 8192),  # 1024
        "in_channels": Bound(1, 64),  # 4
        "out_channels": Bound(1, 64),  # 4
        "sample_size": Bound(1, 1024),  # 64 (latent side)
        "norm_num_groups": Bound(1, 1024),  # 32
    },
    "vae": {
        "block_out_channels": Bound(1, 4096),  # 128, 256, 512, 512
        "levels": Bound(1, 6),  # 4
        "layers_per_block": Bound(1, 8),  # 2
        "latent_channels": Bound(1, 64),  # 4
        "in_channels": Bound(1, 16),  # 3
        "out_channels": Bound(1, 16),  # 3
        "sample_size": Bound(1, 4096),  # 512 (768 for SD 2.1-768)
        "norm_num_groups": Bound(1, 1024),  # 32
        "scaling_factor": Bound(1e-6, 100.0, float),  # 0.18215
    },
    "vre": {
        "n_embed": Bound(1, 65536),  # 1024 dictionary entries
        "embed_dim": Bound(1, 4096),  # 512
        "ch": Bound(1, 1024),  # 64
        "ch_mult": Bound(1, 64),  # 1, 2, 2, 2, 4, 8
        "levels": Bound(1, 8),  # 6 (length of ch_mult)
        "widest_channel": Bound(1, 4096),  # ch · max(ch_mult) = 512
        "num_res_blocks": Bound(1, 8),  # 2
        "attn_resolutions": Bound(1, 4096),  # 16
        "attn_levels": Bound(0, 8),  # 1 (length of attn_resolutions)
        "dropout": Bound(0.0, 0.999, float),  # 0.0
        "in_channels": Bound(1, 16),  # 3
        "resolution": Bound(8, 2048),  # 512
        "z_channels": Bound(1, 4096),  # 512
        "head_size": Bound(1, 64),  # 1
        "num_tokens": Bound(1, 1024),  # 77
        "distance_matrix": Bound(1, 1 << 26),  # (16·16 grid) · 1024 codes = 262144 per face
    },
    "prompt_adapter": {
        "in_channels": Bound(2, 8192),  # 512 (hidden width in_channels // 2 must be >= 1)
        "out_channels": Bound(1, 8192),  # 1024
    },
    "scheduler": {
        "num_train_timesteps": Bound(1, 10000),  # 1000
        "beta_start": Bound(1e-8, 0.999, float),  # 0.00085
        "beta_end": Bound(1e-8, 0.999, float),  # 0.012
    },
    "model_index": {
        "timestep": Bound(0, 9999),  # 399 (also < the scheduler's num_train_timesteps)
        "resolution": Bound(8, 2048),  # 512 (also = the VRE's resolution)
        "vae_activation": Bound(1, 1 << 31),  # max over VAE levels of channels · side², per face
    },
    "lora": {
        "lora_alpha": Bound(1e-6, 1e4, float),  # 16
        "r": Bound(1, 4096),  # 16
    },
}

#: diffusers' beta schedules that DDIMScheduler implements (others raise NotImplementedError there).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VRE_INPUT_NORMALIZATIONS = ("official", "standard")

#: Fields a model-folder config must carry (``save_pretrained`` writes all of them); the
#: cross-checks need them, and a diffusers default silently standing in for a lost field would
#: hide a broken file.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
             "cross_attention_dim"),
    "vae": ("latent_channels", "block_out_channels"),
    "vre": ("n_embed", "embed_dim", "ch", "ch_mult", "resolution"),
    "prompt_adapter": ("in_channels", "out_channels"),
    "scheduler": (),
}


def read_config(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON config that must be an object.

    Raises:
        ModelFileError: missing, unreadable, malformed, or not a JSON object (naming the file).
    """
    from .utils.io import read_json

    cfg = read_json(path, what=what)
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{path}: {what} must be a JSON object, got {type(cfg).__name__}")
    return cfg


# --------------------------------------------------------------------------------- field checks
def _is_number(v: Any, kind: type) -> bool:
    if isinstance(v, bool):
        return False
    if kind is int:
        return isinstance(v, int)
    return isinstance(v, (int, float)) and math.isfinite(v)


def check_value(source: str | os.PathLike, field: str, value: Any, bound: Bound) -> None:
    """One number against its bound: wrong type or outside ``bound`` → :class:`ModelFileError`."""
    if not _is_number(value, bound.kind):
        want = "an integer" if bound.kind is int else "a finite number"
        raise ModelFileError(f"{source}: {field} must be {want}, got {value!r}")
    if not bound.low <= value <= bound.high:
        raise ModelFileError(f"{source}: {field} = {value!r} is outside the sane range {bound}")


def _ints(source, cfg: Mapping[str, Any], field: str, bound: Bound, length: Bound | None = None,
          scalar_ok: bool = True, nullable: bool = True) -> list[int]:
    """A field that is a number or (with ``length``) a list of numbers → list of checked numbers.

    Absent or ``null`` gives ``[]`` (the class default applies) unless ``nullable=False``.
    """
    value = cfg.get(field)
    if value is None:
        if not nullable and field in cfg:
            raise ModelFileError(f"{source}: {field} must not be null")
        return []
    if isinstance(value, (list, tuple)):
        if length is None:
            raise ModelFileError(f"{source}: {field} must be a single number, got {value!r}")
        if length is not None and not length.low <= len(value) <= length.high:
            raise ModelFileError(f"{source}: {field} has {len(value)} entries, outside the sane range {length}")
        for i, v in enumerate(value):
            check_value(source, f"{field}[{i}]", v, bound)
        return list(value)
    if not scalar_ok:
        raise ModelFileError(f"{source}: {field} must be a list, got {value!r}")
    check_value(source, field, value, bound)
    return [value]


def _require(source, cfg: Mapping[str, Any], component: str) -> None:
    missing = [f for f in REQUIRED_FIELDS[component] if f not in cfg]
    if missing:
        raise ModelFileError(f"{source}: missing required field(s) {', '.join(missing)}")


def _str_list(source, cfg: Mapping[str, Any], field: str, n: int) -> None:
    value = cfg.get(field)
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelFileError(f"{source}: {field} must be a list of block-type names, got {value!r}")
    if len(value) != n:
        raise ModelFileError(f"{source}: {field} has {len(value)} entries but block_out_channels has {n}")


def _groups_divide(source, cfg: Mapping[str, Any], channels: Iterable[int]) -> None:
    groups = cfg.get("norm_num_groups")
    if groups is None:
        return
    bad = [c for c in channels if c % groups]
    if bad:
        raise ModelFileError(f"{source}: norm_num_groups = {groups} does not divide block_out_channels {bad}")


def check_unet_config(cfg: Mapping[str, Any], source: str | os.PathLike) -> None:
    """``unet/config.json`` (diffusers ``UNet2DConditionModel``) against :data:`LIMITS` ``["unet"]``."""
    lim = LIMITS["unet"]
    _require(source, cfg, "unet")
    channels = _ints(source, cfg, "block_out_channels", lim["block_out_channels"], lim["levels"], scalar_ok=False,
                     nullable=False)
    _str_list(source, cfg, "down_block_types", len(channels))
    _str_list(source, cfg, "up_block_types", len(channels))
    _ints(source, cfg, "cross_attention_dim", lim["cross_attention_dim"], lim["levels"], nullable=False)
    for field in ("layers_per_block", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
        _ints(source, cfg, field, lim[field], lim["levels"])
    for field in ("in_channels", "out_channels", "norm_num_groups"):
        _ints(source, cfg, field, lim[field], nullable=field == "norm_num_groups")
    _ints(source, cfg, "sample_size", lim["sample_size"], Bound(2, 2))
    _groups_divide(source, cfg, channels)


def check_vae_config(cfg: Mapping[str, Any], source: str | os.PathLike) -> None:
    """``vae/config.json`` (diffusers ``AutoencoderKL``) against :data:`LIMITS` ``["vae"]``."""
    lim = LIMITS["vae"]
    _require(source, cfg, "vae")
    channels = _ints(source, cfg, "block_out_channels", lim["block_out_channels"], lim["levels"], scalar_ok=False,
                     nullable=False)
    _str_list(source, cfg, "down_block_types", len(channels))
    _str_list(source, cfg, "up_block_types", len(channels))
    for field in ("layers_per_block", "latent_channels", "in_channels", "out_channels", "norm_num_groups"):
        _ints(source, cfg, field, lim[field], nullable=False)
    _ints(source, cfg, "sample_size", lim["sample_size"], Bound(2, 2))
    if cfg.get("scaling_factor") is not None:
        check_value(source, "scaling_factor", cfg["scaling_factor"], lim["scaling_factor"])
    _groups_divide(source, cfg, channels)


def check_vre_config(cfg: Mapping[str, Any], source: str | os.PathLike) -> None:
    """``vre/config.json`` (:class:`~osdface.models.VisualPromptEncoder`) against :data:`LIMITS` ``["vre"]``.

    Besides the fields: the widest encoder channel ``ch · max(ch_mult)``, the resolution must be
    divisible by the encoder's downsampling ``2^(len(ch_mult) − 1)``, the attention head count
    must divide the channels, and the per-face distance matrix ``grid² · n_embed`` is bounded.
    """
    lim = LIMITS["vre"]
    _require(source, cfg, "vre")
    for field in ("n_embed", "embed_dim", "ch", "num_res_blocks", "in_channels", "resolution", "z_channels",
                  "head_size", "num_tokens"):
        _ints(source, cfg, field, lim[field], nullable=False)
    mult = _ints(source, cfg, "ch_mult", lim["ch_mult"], lim["levels"], scalar_ok=False, nullable=False)
    _ints(source, cfg, "attn_resolutions", lim["attn_resolutions"], lim["attn_levels"], scalar_ok=False,
          nullable=False)
    if cfg.get("dropout") is not None:
        check_value(source, "dropout", cfg["dropout"], lim["dropout"])
    if "enable_mid" in cfg and not isinstance(cfg["enable_mid"], bool):
        raise ModelFileError(f"{source}: enable_mid must be true or false, got {cfg['enable_mid']!r}")
    norm = cfg.get("input_normalization", "official")
    if norm not in VRE_INPUT_NORMALIZATIONS:
        raise ModelFileError(f"{source}: input_normalization must be one of {VRE_INPUT_NORMALIZATIONS}, got {norm!r}")
    if not mult:
        raise ModelFileError(f"{source}: ch_mult must have at least one entry")
    widest = cfg["ch"] * max(mult)
    if widest > lim["widest_channel"].high:
        raise ModelFileError(f"{source}: ch · max(ch_mult) = {widest} is outside the sane range "
                             f"{lim['widest_channel']}")
    head = cfg.get("head_size", 1)
    bad = sorted({cfg["ch"] * m for m in mult if (cfg["ch"] * m) % head})
    if bad:
        raise ModelFileError(f"{source}: head_size = {head} does not divide the encoder channels {bad}")
    factor = 2 ** (len(mult) - 1)
    res = cfg["resolution"]
    if res % factor:
        raise ModelFileError(f"{source}: resolution = {res} is not divisible by the encoder's downsampling "
                             f"factor {factor} (2^(len(ch_mult) - 1))")
    cells = (res // factor) ** 2 * cfg["n_embed"]
    if cells > lim["distance_matrix"].high:
        raise ModelFileError(f"{source}: (resolution / {factor})² · n_embed = {cells} distances per face is "
                             f"outside the sane range {lim['distance_matrix']}")


def check_adapter_config(cfg: Mapping[str, Any], source: str | os.PathLike) -> None:
    """``prompt_adapter/config.json`` against :data:`LIMITS` ``["prompt_adapter"]``."""
    _require(source, cfg, "prompt_adapter")
    for field, bound in LIMITS["prompt_adapter"].items():
        _ints(source, cfg, field, bound, nullable=False)


def check_scheduler_config(cfg: Mapping[str, Any], source: str | os.PathLike) -> int:
    """``scheduler/scheduler_config.json`` against :data:`LIMITS` ``["scheduler"]``; returns
    ``num_train_timesteps`` (diffusers' default 1000 when absent)."""
    lim = LIMITS["scheduler"]
    n = cfg.get("num_train_timesteps", 1000)
    check_value(source, "num_train_timesteps", n, lim["num_train_timesteps"])
    for field in ("beta_start", "beta_end"):
        if field in cfg:
            check_value(source, field, cfg[field], lim[field])
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
        raise ModelFileError(f"{source}: beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    betas = cfg.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != n:
            raise ModelFileError(f"{source}: trained_betas must be a list of num_train_timesteps = {n} numbers")
        for i, b in enumerate(betas):
            check_value(source, f"trained_betas[{i}]", b, Bound(0.0, 0.999, float))
    return n


def check_lora_config(cfg: Mapping[str, Any], source: str | os.PathLike) -> float | None:
    """``unet_lora/adapter_config.json``: returns ``lora_alpha`` (``None`` when absent = the rank)."""
    lim = LIMITS["lora"]
    if cfg.get("r") is not None:
        check_value(source, "r", cfg["r"], lim["r"])
    alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    check_value(source, "lora_alpha", alpha, lim["lora_alpha"])
    return float(alpha)


# --------------------------------------------------------------------------------- cross-checks
ConfigSet = Mapping[str, tuple[str | os.PathLike, Mapping[str, Any]]]

_COMPONENT_CHECKS = {
    "unet": check_unet_config,
    "vae": check_vae_config,
    "vre": check_vre_config,
    "prompt_adapter": check_adapter_config,
}


def check_latent_channels(unet: Mapping[str, Any], unet_file, vae: Mapping[str, Any], vae_file) -> None:
    """The UNet's ``in_channels`` and ``out_channels`` must equal the VAE's ``latent_channels``.

    Raises:
        ModelFileError: naming the UNet config, the field, both values and the VAE config.
    """
    latent = vae["latent_channels"]
    for field in ("in_channels", "out_channels"):
        if unet[field] != latent:
            raise ModelFileError(f"{unet_file}: {field} = {unet[field]} does not match the VAE's latent_channels = "
                                 f"{latent} ({vae_file})")


def check_model_folder_configs(index: Mapping[str, Any], index_source: str | os.PathLike,
                               configs: ConfigSet) -> tuple[int, int]:
    """Check every config of a model folder alone and against the others, before anything is built.

    Args:
        index: the parsed ``model_index.json``; ``index_source`` its path (for messages).
        configs: component (``"unet"``, ``"vae"``, ``"vre"``, ``"prompt_adapter"``, ``"scheduler"``)
            → ``(config file path, parsed config)``.

    Returns:
        ``(timestep, resolution)`` as the pipeline will use them (defaults filled in: 399 and the
        VRE's resolution).

    Raises:
        ModelFileError: naming the file, the field, the value and the bound (or the other file).
    """
    from .constants import TIMESTEP

    for name, check in _COMPONENT_CHECKS.items():
        check(configs[name][1], configs[name][0])
    sched_file, sched = configs["scheduler"]
    n_train = check_scheduler_config(sched, sched_file)
    (unet_file, unet), (vae_file, vae) = configs["unet"], configs["vae"]
    (vre_file, vre), (adapter_file, adapter) = configs["vre"], configs["prompt_adapter"]

    check_latent_channels(unet, unet_file, vae, vae_file)
    cross = unet["cross_attention_dim"]
    cross_dims = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if cross_dims != {adapter["out_channels"]}:
        raise ModelFileError(f"{unet_file}: cross_attention_dim = {cross} does not match the prompt adapter's "
                             f"out_channels = {adapter['out_channels']} ({adapter_file})")
    if adapter["in_channels"] != vre["embed_dim"]:
        raise ModelFileError(f"{adapter_file}: in_channels = {adapter['in_channels']} does not match the VRE's "
                             f"embed_dim = {vre['embed_dim']} ({vre_file})")

    lim = LIMITS["model_index"]
    timestep = index.get("timestep", TIMESTEP)
    check_value(index_source, "timestep", timestep, lim["timestep"])
    if timestep >= n_train:
        raise ModelFileError(f"{index_source}: timestep = {timestep} is outside the scheduler's range "
                             f"[0, {n_train - 1}] ({sched_file})")
    resolution = index.get("resolution")
    if resolution is None:
        resolution = vre["resolution"]
    check_value(index_source, "resolution", resolution, lim["resolution"])
    if resolution != vre["resolution"]:
        raise ModelFileError(f"{index_source}: resolution = {resolution} does not match the VRE's resolution = "
                             f"{vre['resolution']} ({vre_file})")
    vae_ch = vae["block_out_channels"]
    vae_factor = 2 ** (len(vae_ch) - 1)
    unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
    if resolution % (vae_factor * unet_factor):
        raise ModelFileError(f"{index_source}: resolution = {resolution} is not divisible by {vae_factor * unet_factor} "
                             f"(the VAE's downsampling {vae_factor} × the UNet's {unet_factor})")
    # the widest activation of one face in the VAE: level i runs at side R/2^i with up to
    # max(c_i, c_{i+1}) channels (the decoder upsamples c_{i+1} channels to side R/2^i)
    act = max(max(vae_ch[i], vae_ch[min(i + 1, len(vae_ch) - 1)]) * (resolution // 2**i) ** 2
              for i in range(len(vae_ch)))
    if act > lim["vae_activation"].high:
        raise ModelFileError(f"{index_source}: resolution = {resolution} with the VAE's block_out_channels "
                             f"{vae_ch} ({vae_file}) needs {act} activations per face, outside the sane range "
                             f"{lim['vae_activation']}")
    return int(timestep), int(resolution)


# ------------------------------------------------------------------------------ weight values
def first_nonfinite_key(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str | None:
    """The first key (in order) whose floating-point tensor holds NaN or ±Inf; ``None`` if all finite.

    Meant for small weights (LoRA, prompt adapter, VRE): one ``isfinite`` reduction per tensor.
    """
    import torch

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


def check_finite_weights(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], source: str | Path) -> None:
    """Raise :class:`ModelFileError` naming ``source`` and the first tensor holding NaN/Inf."""
    key = first_nonfinite_key(tensors)
    if key is not None:
        raise ModelFileError(f"{source}: tensor {key!r} contains NaN or Inf values; the file is broken")
