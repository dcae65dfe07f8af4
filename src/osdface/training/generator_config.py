"""Stage-2 experiment settings (docs/method.md §6): typed, frozen sections of :class:`GeneratorExperiment`.

Read from YAML with dotted ``--set`` overrides by :func:`load_generator_config` (the machinery of
:mod:`osdface.training.config`); every value is checked against :data:`~osdface.training.config.BOUNDS`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..constants import TIMESTEP
from ..models.latent_discriminator import DEFAULT_DISC_LORA_TARGETS
from ..models.lora import DEFAULT_UNET_LORA_TARGETS
from .config import ConfigError, DataConfig, TrainConfig, check_bounds, load_config


@dataclass(frozen=True)
class GeneratorLoraConfig:
    """LoRA of the generator UNet (docs/method.md §4: rank 16, alpha 16; targets [OURS] = OSEDiff's list).

    Ignored when fine-tuning the official release (its file fixes rank and targets; alpha = rank).
    """

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_UNET_LORA_TARGETS
    init: Literal["default", "gaussian"] = "default"

    def __post_init__(self) -> None:
        check_bounds(self, "model.lora")


@dataclass(frozen=True)
class LatentDiscriminatorConfig:
    """The latent discriminator (docs/method.md §6.2d, all [OURS]): SD-UNet encoder copy + LoRA + MLP head.

    Attributes:
        head_channels: hidden width of the head (512).
        lora_rank / lora_alpha / lora_targets: LoRA on the frozen backbone.
        t_min / t_max: range of the diffusion timestep of the noised latents (0..999).
    """

    head_channels: int = 512
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_DISC_LORA_TARGETS
    t_min: int = 0
    t_max: int = 999

    def __post_init__(self) -> None:
        check_bounds(self, "model.discriminator")
        if self.t_min > self.t_max:
            raise ConfigError(f"model.discriminator.t_min ({self.t_min}) must be ≤ t_max ({self.t_max})",
                              key="model.discriminator")


@dataclass(frozen=True)
class GeneratorModelConfig:
    """Models of stage 2.

    Attributes:
        base_model: Stable Diffusion 2.1-base diffusers folder (``scheduler/``, ``unet/``, ``vae/``);
            the CLI's ``--base-model``.
        vre: the frozen VRE: a :class:`~osdface.models.VisualPromptEncoder` folder (stage-1 export
            ``vre/``) or an ``associate_2.ckpt``-layout file (stage 1's or the official one); ``--vre``.
        weights: official release folder to fine-tune from (VRE + adapter + LoRA); ``--weights``.
            With both, ``vre`` replaces the release's VRE.
        timestep: the fixed UNet timestep (399).
        latent: VAE latent of the LQ (and GT) image: posterior ``mode`` (deterministic, [OURS]) or a
            ``sample`` (the official inference; seeded per step).
        lora / discriminator: see their sections.
        gradient_checkpointing: checkpoint the UNet, VAE decoder and discriminator blocks.
        attention: ``sdpa`` (PyTorch's memory-efficient/flash attention, default), ``xformers``
            (needs the package) or ``classic`` (plain attention; reference only).
        frozen_dtype: dtype of the frozen weights (VAE, VRE, UNet base); ``fp16``/``bf16`` need
            ``train.mixed_precision`` ≠ ``no``. Trainable tensors always stay float32.
    """

    base_model: str | None = None
    vre: str | None = None
    weights: str | None = None
    timestep: int = TIMESTEP
    latent: Literal["mode", "sample"] = "mode"
    lora: GeneratorLoraConfig = field(default_factory=GeneratorLoraConfig)
    discriminator: LatentDiscriminatorConfig = field(default_factory=LatentDiscriminatorConfig)
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers", "classic"] = "sdpa"
    frozen_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        check_bounds(self, "model")


@dataclass(frozen=True)
class GeneratorLossConfig:
    """Loss weights (docs/method.md §6.2; the paper's λ values are unknown: [OURS] starting point 1/1/0.1/0.05).

    Attributes:
        mse: λ of MSE on decoded images in [-1, 1].
        ea_dists: λ_per of EA-DISTS (DISTS + DISTS of Sobel edges, images in [0, 1]).
        identity: λ_ID of ``1 − cos`` identity loss.
        gan: λ_dis of the latent GAN generator loss (``0`` disables the discriminator).
        gan_kind: ``non_saturating`` (spec), ``hinge`` or ``lsgan``.
        gan_start: first step with the GAN term and discriminator updates.
        d_every: update the discriminator every ``d_every`` steps (1 = alternate every step).
        perceptual_pretrained: ``False`` = random DISTS network (tests, tiny runs).
        weights_dir: metrics weights folder (DISTS, identity nets); default ``$OSDFACE_HOME/metrics``.
        identity_network: ``arcface`` (paper; user-supplied file), ``facenet`` (offline), ``iresnet50|100``.
        identity_weights: identity network weight file (default: its file in ``weights_dir``).
        identity_pretrained: ``False`` = random identity network (tests, tiny runs).
    """

    mse: float = 1.0
    ea_dists: float = 1.0
    identity: float = 0.1
    gan: float = 0.05
    gan_kind: Literal["non_saturating", "hinge", "lsgan"] = "non_saturating"
    gan_start: int = 0
    d_every: int = 1
    perceptual_pretrained: bool = True
    weights_dir: str | None = None
    identity_network: Literal["arcface", "facenet", "iresnet50", "iresnet100"] = "arcface"
    identity_weights: str | None = None
    identity_pretrained: bool = True

    def __post_init__(self) -> None:
        check_bounds(self, "loss")


@dataclass(frozen=True)
class GeneratorOptimConfig:
    """AdamW for the generator (LoRA + adapter) and the discriminator ([OURS]: OSEDiff's face recipe).

    Attributes:
        lr / disc_lr: learning rates (``disc_lr`` ``None`` = ``lr``).
        warmup_steps: linear warm-up of both rates from 0.
        grad_clip: max gradient norm per model (``0`` = off).
    """

    lr: float = 5e-5
    disc_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_bounds(self, "optim")


@dataclass(frozen=True)
class GeneratorValConfig:
    """Validation during training: restore the fixed validation faces and score them.

    Attributes:
        metrics: evaluation-layer metric names (``osdface.evaluation.create_metric``).
        pretrained: ``False`` = random-init metric backbones (tiny runs; numbers only track change).
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``).
    """

    metrics: tuple[str, ...] = ("lpips", "dists", "ids")
    pretrained: bool = True
    weights_dir: str | None = None


@dataclass(frozen=True)
class GeneratorExperiment:
    """A stage-2 experiment."""

    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    loss: GeneratorLossConfig = field(default_factory=GeneratorLossConfig)
    optim: GeneratorOptimConfig = field(default_factory=GeneratorOptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: GeneratorValConfig = field(default_factory=GeneratorValConfig)


def load_generator_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> GeneratorExperiment:
    """YAML file + ``key.sub=value`` overrides → :class:`GeneratorExperiment` (unknown keys raise)."""
    return load_config(GeneratorExperiment, path, overrides)


__all__ = [
    "GeneratorExperiment", "GeneratorModelConfig", "GeneratorLoraConfig", "LatentDiscriminatorConfig",
    "GeneratorLossConfig", "GeneratorOptimConfig", "GeneratorValConfig", "load_generator_config",
]
