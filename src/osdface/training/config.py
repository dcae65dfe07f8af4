"""Experiment configuration of both training stages: the shared sections and the table of bounds.

The generic machinery (YAML → frozen typed dataclasses, unknown keys with suggestions, dotted
``--set`` overrides, :func:`load_config`, :func:`dump_yaml`) lives in :mod:`osdface.config`, below
the data and training layers; every name of it is re-exported here. This module holds:

* :data:`BOUNDS`, the one table of plausible ranges for the sizes, counts and weights of both
  stages (a typo such as ``model.vqgan.ch=100000`` is a :class:`ConfigError` naming the field,
  value and bound, not an out-of-memory crash); each section checks its fields against it with
  :func:`check_bounds`;
* the shared sections :class:`TrainConfig` and :class:`DataConfig` (whose ``degradation`` is the
  nested :class:`~osdface.data.degradation.DegradationConfig` section); stage-specific experiment
  classes compose them.

Defaults live in the dataclasses only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .. import config as _generic
from ..config import (  # re-exported: the generic machinery, below the data and training layers
    Bound,
    ConfigError,
    ConfigFileNotFoundError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from ..data.degradation import DegradationConfig

__all__ = [
    "BOUNDS",
    "Bound",
    "ConfigError",
    "ConfigFileNotFoundError",
    "DataConfig",
    "TrainConfig",
    "apply_overrides",
    "check_bounds",
    "check_value",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "to_dict",
]


# ------------------------------------------------------------------------------------- bounds
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


_TABLE = "osdface.training.config.BOUNDS"


def check_value(key: str, value: float, section: str) -> None:
    """Check a derived number (``BOUNDS[key]``, e.g. the widest layer) of the config section ``section``.

    Raises:
        ConfigError: naming ``key``, the value and the bound; its ``key`` attribute is ``section``.
    """
    _generic.check_number(key, value, BOUNDS[key], _TABLE, err_key=section)


def check_bounds(section: Any, prefix: str) -> None:
    """Check the plain (non-section) fields of the config ``section`` found at ``prefix`` against :data:`BOUNDS`.

    Sections call this from ``__post_init__``, so a config is checked however it is built.

    Raises:
        ConfigError: naming the field, the value and the bound.
    """
    _generic.check_bounds(section, prefix, BOUNDS, _TABLE)


# ----------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Training data: aligned HQ faces, LQ synthesised on the fly (``osdface.data``).

    Attributes:
        size: face side in pixels.
        hflip: random horizontal flips.
        degradation: the degradation ranges (:class:`~osdface.data.degradation.DegradationConfig`).
            A config file may give a preset name (``daefr``, ``osediff-face``), a degradation
            YAML path, or a mapping of fields, optionally starting from ``preset: NAME``; the
            resolved config holds every field.
        num_workers: DataLoader workers per process.
        val_images: validation images taken from the front of the validation folders (or of
            the training set when no validation folder is given).
    """

    size: int = 512
    hflip: bool = True
    degradation: DegradationConfig = field(default_factory=DegradationConfig)  # = the daefr preset
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
