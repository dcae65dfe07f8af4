"""Stage 2: train the one-step generator (UNet LoRA + prompt adapter) with GAN guidance (docs/method.md §6).

The generator is exactly the inference forward of :class:`~osdface.pipelines.OSDFacePipeline`
(its own ``encode_prompt`` / ``encode_latent`` / ``predict_x0`` / ``decode``, differentiable):

``lq → prompt = adapter(VRE(lq)) ; z_L = E_vae(lq) ; ε̂ = UNet_LoRA(z_L, 399, prompt) ;
ẑ_H = (z_L − √(1−ᾱ)·ε̂)/√ᾱ ; pred = D_vae(ẑ_H)``

Trainable: the UNet's LoRA (peft; rank/alpha/targets from the config) and the prompt adapter.
Frozen: UNet base weights, VAE (encoder and decoder — gradients still flow *through* the decoder),
VRE. The latent discriminator (:class:`~osdface.models.latent_discriminator.LatentDiscriminator`)
trains its LoRA and head.

Per micro-batch, two explicit steps:

* :meth:`GeneratorTask.generator_step` — discriminator frozen (``requires_grad`` off):
  ``L_G = λ_mse·MSE(pred, gt) + λ_per·EA-DISTS + λ_id·(1 − cos ID) + λ_gan·softplus(−D(F(ẑ_H, t)))``;
* :meth:`GeneratorTask.discriminator_step` — on ``z_H = E_vae(gt)`` vs detached ``ẑ_H``, same
  ``t ~ U{0..999}`` and ``ε``; non-saturating loss.

Starting points: from scratch (fresh LoRA + adapter; the frozen VRE from stage 1 or the official
``associate_2.ckpt``), or fine-tuning the official release (``model.weights``: VRE + adapter + LoRA,
the LoRA kept unmerged and trainable).

Checkpoints hold only what trains or cannot be rebuilt: ``unet_lora/`` (official PEFT keys),
``prompt_adapter/``, ``vre/`` and ``discriminator/`` (LoRA + head only; its frozen backbone is a
copy of the base UNet). The accelerate state stores only trainable tensors as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..constants import TIMESTEP
from ..errors import ModelFileError, WeightsNotFoundError
from ..image import to_model_range
from ..losses.bundle import LossBundle
from ..losses.pixel import MSELoss
from ..models.latent_discriminator import DEFAULT_DISC_LORA_TARGETS, LatentDiscriminator
from ..models.lora import DEFAULT_UNET_LORA_TARGETS
from ..models.prompt_encoder import PromptAdapter, VisualPromptEncoder
from ..utils.io import atomic_path, normalize_permissions
from ..utils.logging import get_logger
from .checkpoint import load_module_folder, resolve_checkpoint
from .config import ConfigError, DataConfig, TrainConfig, check_bounds, dump_yaml, load_config
from .trainer import Trainer, TrainingTask

logger = get_logger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
DISC_TRAINABLE_NAME = "trainable.safetensors"
OFFICIAL_VRE_NAME = "associate_2.ckpt"
OFFICIAL_ADAPTER_NAME = "embedding_change_weights.pth"
OFFICIAL_LORA_NAME = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------- config
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


# ------------------------------------------------------------------------------ components
def load_vre_folder(folder: str | os.PathLike) -> VisualPromptEncoder:
    """A :class:`VisualPromptEncoder` ``save_pretrained`` folder, its config checked against
    :mod:`osdface.model_limits` and its declared size against its weights before anything is built.

    Raises:
        WeightsNotFoundError, ModelFileError: see :func:`~osdface.training.checkpoint.load_module_folder`.
    """
    from ..model_limits import check_vre_config

    return load_module_folder(VisualPromptEncoder, folder, "visual prompt encoder", check=check_vre_config)


def load_vre(path: str | os.PathLike) -> VisualPromptEncoder:
    """A frozen VRE from a ``VisualPromptEncoder`` folder or an ``associate_2.ckpt``-layout file.

    The architecture of a checkpoint file is read from its tensor shapes (as ``from_official``).

    Raises:
        WeightsNotFoundError: nothing usable at ``path``.
        ModelFileError / UnsafeCheckpointError: a malformed, implausible or unsafe file (named).
    """
    from ..weights import load_official_vre

    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return load_vre_folder(p)
        for sub in (p / "vre", p / "export" / "vre"):  # a stage-1 export or run folder
            if (sub / "config.json").is_file():
                return load_vre_folder(sub)
        if (p / OFFICIAL_VRE_NAME).is_file():
            p = p / OFFICIAL_VRE_NAME
        else:
            raise WeightsNotFoundError(
                f"{p} holds no VRE: give a VisualPromptEncoder folder (config.json + safetensors, e.g. a "
                f"stage-1 RUN/export/vre) or an {OFFICIAL_VRE_NAME} file")
    if not p.is_file():
        raise WeightsNotFoundError(
            f"VRE {p} not found: pass --vre with a stage-1 export (RUN/export/vre or RUN/export/{OFFICIAL_VRE_NAME}) "
            f"or the official {OFFICIAL_VRE_NAME}")
    return load_official_vre(p)


def load_base_model(base_model: str | os.PathLike) -> dict[str, Any]:
    """``{"unet", "vae", "scheduler"}`` of a Stable Diffusion 2.1-base diffusers folder, each config
    checked against :mod:`osdface.model_limits` (and each declared size against its weights) first;
    only safetensors weights are read (:func:`osdface.io.model_folders.load_base_model`).

    Raises:
        WeightsNotFoundError: a subfolder, config or weights file is missing.
        ModelFileError: a malformed or implausible config or weights file (named).
    """
    from ..io.model_folders import load_base_model as _load_base_model

    return _load_base_model(base_model, safetensors_only=True)


def load_components(cfg: GeneratorModelConfig) -> dict[str, Any]:
    """Read the base model and the VRE/adapter/LoRA starting point named by ``cfg`` (local files only).

    Returns ``{"vae", "unet", "scheduler", "vre", "prompt_adapter" (or None), "lora" (state dict or None),
    "lora_source" (its file, for messages; or None)}``.

    Raises:
        WeightsNotFoundError: a folder or file is missing.
        ModelFileError / UnsafeCheckpointError / LoraFormatError: a malformed, implausible or
            unsafe file (the message names it).
    """
    from ..io.model_folders import read_lora_file, read_official_adapter
    from ..io.names import OFFICIAL_VRE_FILE
    from ..weights import find_official_files

    if not cfg.base_model:
        raise WeightsNotFoundError("no base model: pass --base-model SD_DIR (the Stable Diffusion 2.1-base "
                                   "diffusers folder with scheduler/, unet/, vae/) or set model.base_model")
    if not cfg.vre and not cfg.weights:
        raise WeightsNotFoundError(f"no VRE: pass --vre PATH (stage-1 export or {OFFICIAL_VRE_FILE}) to train from "
                                   "scratch, or --weights OSDFACE_DIR to fine-tune the official release")
    out: dict[str, Any] = {**load_base_model(cfg.base_model), "prompt_adapter": None, "lora": None,
                           "lora_source": None}
    if cfg.weights:
        files = find_official_files(cfg.weights)
        vre = load_vre(cfg.vre or files.vre)
        adapter = read_official_adapter(files.adapter, vre.config.embed_dim, out["unet"].config.cross_attention_dim)
        lora = read_lora_file(files.lora)
        out.update(vre=vre, prompt_adapter=adapter, lora=lora.state_dict, lora_source=str(lora.file))
        logger.info("fine-tuning the official release in %s", cfg.weights)
    else:
        out["vre"] = load_vre(cfg.vre)
    return out


class LoraFolder:
    """Checkpoint view of the UNet's peft LoRA: ``save_pretrained`` writes the official PEFT keys
    (``unet.<module>.lora_A.weight``, float32) + ``adapter_config.json`` (the pipeline's ``unet_lora/``
    layout; :func:`osdface.io.model_folders.write_lora_folder`)."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self) -> dict[str, torch.Tensor]:
        from ..io.model_folders import lora_state_dict

        return lora_state_dict(self.unet, torch.float32)

    def config(self) -> dict[str, Any]:
        from ..io.model_folders import lora_adapter_config

        return lora_adapter_config(self.unet)

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        from ..io.model_folders import write_lora_folder

        write_lora_folder(folder, self.unet, torch.float32)


class DiscriminatorFolder:
    """Checkpoint view of the latent discriminator: its config + only the trainable tensors."""

    def __init__(self, disc: LatentDiscriminator):
        self.disc = disc

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.disc.save_config(folder)
        sd = {k: v.detach().float().cpu().contiguous() for k, v in self.disc.trainable_state_dict().items()}
        with atomic_path(folder / DISC_TRAINABLE_NAME) as tmp:
            save_file(sd, str(tmp))


def load_discriminator(folder: str | os.PathLike, unet) -> LatentDiscriminator:
    """Rebuild a checkpointed discriminator: backbone copied from ``unet``, LoRA + head from ``folder``.

    Raises:
        ModelFileError: a malformed or implausible config, or tensors that do not match it (named).
    """
    from ..safe_load import load_safetensors
    from ..utils.io import read_json

    folder = Path(folder)
    config_file = folder / "config.json"
    cfg = read_json(config_file, what="discriminator config")
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{config_file}: the discriminator config must be a JSON object")
    try:  # the head and LoRA sizes against the training config's bounds (the backbone is the UNet's)
        LatentDiscriminatorConfig(**{k: cfg[k] for k in ("head_channels", "lora_rank", "lora_alpha") if k in cfg})
    except (ConfigError, TypeError) as e:
        raise ModelFileError(f"{config_file}: {e}") from None
    try:
        disc = LatentDiscriminator.from_config(cfg)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{config_file}: cannot build the discriminator from it ({e})") from e
    disc.load_backbone_from_unet(unet)
    sd = load_safetensors(folder / DISC_TRAINABLE_NAME, what="discriminator")
    expected = disc.trainable_state_dict()
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if set(sd) != set(expected) or wrong:
        raise ModelFileError(f"{folder / DISC_TRAINABLE_NAME}: trainable tensors do not match the discriminator "
                             f"config ({len(set(sd) ^ set(expected))} keys differ, {len(wrong)} shapes differ)")
    disc.load_state_dict(sd, strict=False)
    return disc


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Switch every parameter of ``module`` to ``requires_grad=False``; restore each flag afterwards."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class OneStepGenerator(nn.Module):
    """The trainable generator: ``unet`` (LoRA) + ``prompt_adapter``, running the pipeline's forward.

    The pipeline's frozen VAE and VRE are used but not registered as submodules (they are not
    DDP-wrapped or checkpointed with this module).

    ``forward(lq)``: ``(B, 3, R, R)`` RGB in [0, 1] → ``{"pred": (B, 3, R, R) in [0, 1],
    "z_hat": (B, 4, R/8, R/8) x0 latent, "z_lq": LQ latent, "prompt": (B, T, D)}``.
    """

    def __init__(self, pipe, latent: str = "mode"):
        super().__init__()
        self.unet = pipe.unet
        self.prompt_adapter = pipe.prompt_adapter
        self._pipe = [pipe]  # a list: keep the pipeline (VAE, VRE) out of the module tree
        self.latent = latent

    @property
    def pipe(self):
        return self._pipe[0]

    def forward(self, lq: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        x = to_model_range(lq).to(pipe.vae.dtype)  # (B, 3, R, R) in [-1, 1]
        # the same steps as OSDFacePipeline.restore_tensor, keeping the intermediates
        prompt = pipe.encode_prompt(x)  # (B, T, D); VRE frozen, adapter trainable
        z = pipe.encode_latent(x, latent=self.latent, generator=generator)  # (B, 4, R/8, R/8), frozen
        eps = self.unet(z, pipe.timestep, encoder_hidden_states=prompt.to(z.dtype)).sample
        z_hat = pipe.predict_x0(z, eps)  # float64 maths, float32 out
        pred = pipe.decode(z_hat)  # (B, 3, R, R) in [0, 1], differentiable through the frozen decoder
        return {"pred": pred, "z_hat": z_hat, "z_lq": z, "prompt": prompt}


def _attach_fresh_lora(unet, cfg: GeneratorLoraConfig) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                                init_lora_weights=True if cfg.init == "default" else "gaussian"))


def _set_attention(unet, vae, kind: str) -> None:
    if kind == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError("model.attention=xformers needs the 'xformers' package; use 'sdpa' "
                              "(PyTorch's memory-efficient attention) otherwise", key="model.attention") from None
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    elif kind == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
        vae.set_attn_processor(AttnProcessor())
    # "sdpa": diffusers' default AttnProcessor2_0 (torch.nn.functional.scaled_dot_product_attention)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_generator(cfg: GeneratorExperiment, components: dict[str, Any]):
    """Assemble the pipeline, the trainable generator and the discriminator from loaded components.

    Args:
        components: ``vae``, ``unet``, ``scheduler``, ``vre`` and optionally ``prompt_adapter`` and
            ``lora`` (an official-layout LoRA state dict to attach unmerged).

    Returns:
        ``(pipeline, OneStepGenerator, LatentDiscriminator | None)``; only LoRA, adapter and the
        discriminator's LoRA + head require grad.
    """
    from ..models.lora import attach_lora
    from ..pipelines.pipeline_osdface import OSDFacePipeline

    m = cfg.model
    unet, vae, vre = components["unet"], components["vae"], components["vre"]
    if getattr(unet, "peft_config", None):
        raise ModelFileError(f"{m.base_model or 'the base UNet'}: the UNet already carries a peft adapter; "
                             "pass the plain SD 2.1-base UNet")
    adapter = components.get("prompt_adapter")
    if adapter is None:
        adapter = PromptAdapter(vre.config.embed_dim, unet.config.cross_attention_dim)
    if adapter.config.in_channels != vre.config.embed_dim or adapter.config.out_channels != unet.config.cross_attention_dim:
        raise ModelFileError(
            f"prompt adapter {adapter.config.in_channels}→{adapter.config.out_channels} does not fit VRE width "
            f"{vre.config.embed_dim} ({m.vre or m.weights}) / UNet cross-attention {unet.config.cross_attention_dim} "
            f"({m.base_model})")
    n_steps = components["scheduler"].config.num_train_timesteps
    timesteps = {"model.timestep": m.timestep, **({"model.discriminator.t_max": m.discriminator.t_max}
                                                   if cfg.loss.gan > 0 else {})}
    for name, t in timesteps.items():
        if not 0 <= t < n_steps:
            raise ModelFileError(f"{Path(m.base_model) / 'scheduler' / 'scheduler_config.json'}: the scheduler has "
                                 f"num_train_timesteps = {n_steps}, so {name} = {t} is outside [0, {n_steps})")
    disc = None
    if cfg.loss.gan > 0:
        d = m.discriminator
        disc = LatentDiscriminator.from_unet(unet, head_channels=d.head_channels, lora_rank=d.lora_rank,
                                             lora_alpha=d.lora_alpha, lora_targets=d.lora_targets)
    if components.get("lora") is not None:
        # official file: exact modules, rank from the file, alpha = rank
        attach_lora(unet, components["lora"], source=components.get("lora_source") or "LoRA state dict")
        got = next(iter(unet.peft_config.values()))
        if got.r != m.lora.rank:
            logger.warning("the release LoRA has rank %d (model.lora.rank %d is ignored)", got.r, m.lora.rank)
    else:
        _attach_fresh_lora(unet, m.lora)
    _set_attention(unet, vae, m.attention)
    pipe = OSDFacePipeline(vae, unet, vre, adapter, components["scheduler"], timestep=m.timestep)  # all frozen, eval
    if m.frozen_dtype != "fp32":
        if cfg.train.mixed_precision == "no":
            raise ConfigError(f"model.frozen_dtype={m.frozen_dtype} needs train.mixed_precision fp16/bf16")
        dt = _DTYPES[m.frozen_dtype]
        for mod in (vae, vre, unet):
            mod.to(dt)
        if disc is not None:
            disc.to(dt)
    for name, p in unet.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            p.data = p.data.float()
    for p in adapter.parameters():
        p.requires_grad_(True)
        p.data = p.data.float()
    if disc is not None:
        for p in disc.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if m.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
        if disc is not None:
            disc.enable_gradient_checkpointing()
    gen = OneStepGenerator(pipe, latent=m.latent)
    return pipe, gen, disc


def seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator that is a pure function of ``key`` (resumed runs redraw the same numbers)."""
    digest = hashlib.blake2b("/".join(map(str, ("osdface-g", *key))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# -------------------------------------------------------------------------------------- task
class GeneratorTask(TrainingTask):
    """The stage-2 model/loss step (see the module docstring).

    Args:
        cfg: the experiment.
        components: pre-built components (``vae``, ``unet``, ``scheduler``, ``vre``, optional
            ``prompt_adapter``/``lora``) instead of reading ``cfg.model``'s paths — tests and benchmarks.
    """

    def __init__(self, cfg: GeneratorExperiment, components: dict[str, Any] | None = None):
        self.cfg = cfg
        self._components = components
        self._micro = 0
        self._val_metrics = None

    # -------------------------------------------------------------------------------- build
    def build(self, accelerator) -> None:
        cfg, lc = self.cfg, self.cfg.loss
        self.accelerator = acc = accelerator
        components = self._components if self._components is not None else load_components(cfg.model)
        self._components = None  # do not keep a second reference to the big modules
        self.pipe, gen, disc = build_generator(cfg, components)
        if cfg.data.size != self.pipe.resolution:
            raise ConfigError(f"data.size ({cfg.data.size}) must equal the VRE resolution ({self.pipe.resolution})",
                              key="data.size")
        self.pipe.to(acc.device)
        # losses (frozen networks, never in an optimiser)
        terms: dict[str, nn.Module] = {}
        if lc.mse:
            terms["mse"] = MSELoss()
        if lc.ea_dists:
            from ..losses.perceptual import EdgeAwareDISTSLoss

            terms["ea_dists"] = EdgeAwareDISTSLoss(weights_dir=lc.weights_dir, pretrained=lc.perceptual_pretrained)
        if lc.identity:
            from ..losses.identity import IdentityLoss, build_identity_network

            terms["identity"] = IdentityLoss(build_identity_network(
                lc.identity_network, weights=lc.identity_weights, weights_dir=lc.weights_dir,
                pretrained=lc.identity_pretrained))
        self.losses = nn.ModuleDict(terms).to(acc.device).requires_grad_(False).eval()
        self.weights = {"mse": lc.mse, "ea_dists": lc.ea_dists, "identity": lc.identity, "gan": lc.gan}
        if disc is not None:
            from ..losses.gan_latent import LatentGANLoss

            self.gan_loss = LatentGANLoss(self.pipe.scheduler.alphas_cumprod, kind=lc.gan_kind).to(acc.device)
        # optimisers (AdamW; trainable tensors only)
        o = cfg.optim
        g_params = [p for p in gen.parameters() if p.requires_grad]
        opt_g = torch.optim.AdamW(g_params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self._trainable = {}
        if disc is not None:
            disc.train()
            d_params = [p for p in disc.parameters() if p.requires_grad]
            opt_d = torch.optim.AdamW(d_params, lr=o.disc_lr if o.disc_lr is not None else o.lr, betas=o.betas,
                                      weight_decay=o.weight_decay, eps=o.eps)
            self.gen, self.opt_g, self.disc, self.opt_d = acc.prepare(gen, opt_g, disc, opt_d)
        else:
            self.gen, self.opt_g = acc.prepare(gen, opt_g)
            self.disc = self.opt_d = None
        self.base_lr = o.lr
        self.base_disc_lr = o.disc_lr if o.disc_lr is not None else o.lr
        self._register_state_hooks()
        n_g = sum(p.numel() for p in g_params)
        n_d = sum(p.numel() for p in disc.parameters() if p.requires_grad) if disc is not None else 0
        n_unet = sum(p.numel() for p in self.pipe.unet.parameters())
        logger.info("stage 2: %.2f M trainable generator parameters (LoRA + adapter) of a %.1f M UNet; "
                    "%.2f M trainable discriminator parameters; lr %.3g (disc %.3g)", n_g / 1e6, n_unet / 1e6,
                    n_d / 1e6, self.base_lr, self.base_disc_lr)

    def _register_state_hooks(self) -> None:
        """Make ``accelerator.save_state`` store (and ``load_state`` read) only trainable tensors."""
        acc = self.accelerator
        prepared = [m for m in (self.gen, self.disc) if m is not None]
        keys = []
        for m in prepared:
            inner = acc.unwrap_model(m)
            names = {n for n, p in inner.named_parameters() if p.requires_grad}
            keys.append({k for k in inner.state_dict() if k in names})

        inner_models = [acc.unwrap_model(m) for m in prepared]

        def index_of(model) -> int:
            inner = acc.unwrap_model(model)
            for i, m in enumerate(inner_models):
                if m is inner:
                    return i
            raise RuntimeError("unknown model in accelerate state")

        def strip(k: str) -> str:
            return k[len("module."):] if k.startswith("module.") else k

        def save_hook(models, weights, output_dir):
            for j, model in enumerate(models):
                want = keys[index_of(model)]
                weights[j] = {k: v for k, v in weights[j].items() if strip(k) in want}

        def load_hook(models, input_dir):
            from ..safe_load import load_safetensors

            for j, model in enumerate(list(models)):
                want = keys[index_of(model)]
                f = Path(input_dir) / ("model.safetensors" if j == 0 else f"model_{j}.safetensors")
                sd = {strip(k): v for k, v in load_safetensors(f, what="training state").items()}
                if set(sd) != want:
                    raise ModelFileError(f"{f}: trainable tensors do not match this run's models "
                                         f"({len(set(sd) ^ want)} differ); was it written with another config?")
                inner = acc.unwrap_model(model)
                current = inner.state_dict()
                wrong = sorted(k for k in sd if sd[k].shape != current[k].shape)
                if wrong:
                    raise ModelFileError(f"{f}: tensor {wrong[0]!r} has shape {tuple(sd[wrong[0]].shape)}, this run's "
                                         f"model {tuple(current[wrong[0]].shape)}; was it written with another config?")
                inner.load_state_dict(sd, strict=False)
            models.clear()  # loaded here; accelerate must not try the full state dicts

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    # ------------------------------------------------------------------------------ helpers
    @property
    def gen_module(self) -> OneStepGenerator:
        return self.accelerator.unwrap_model(self.gen)

    @property
    def disc_module(self) -> LatentDiscriminator | None:
        return None if self.disc is None else self.accelerator.unwrap_model(self.disc)

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and self.cfg.loss.gan > 0 and step >= self.cfg.loss.gan_start

    def d_update(self, step: int) -> bool:
        return self.gan_active(step) and (step - self.cfg.loss.gan_start) % self.cfg.loss.d_every == 0

    # --------------------------------------------------------------------------- the G step
    def generator_step(self, batch: dict[str, Any], step: int, loss_scale: float, rng: torch.Generator,
                       gan_inputs=None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Generator losses and backward with the discriminator frozen. Returns (outputs, scalars)."""
        acc = self.accelerator
        lq, gt = batch["lq"], batch["gt"]
        with frozen(self.disc_module):
            with acc.autocast():
                out = self.gen(lq, generator=rng)
            pred = out["pred"].float()
            terms: dict[str, torch.Tensor] = {}
            if "mse" in self.losses:
                terms["mse"] = self.losses["mse"](to_model_range(pred), to_model_range(gt.float()))
            if "ea_dists" in self.losses:
                terms["ea_dists"] = self.losses["ea_dists"](pred, gt.float())
            if "identity" in self.losses:
                terms["identity"] = self.losses["identity"](pred, gt.float())
            logs: dict[str, float] = {}
            if gan_inputs is not None:
                with acc.autocast():
                    g_gan, logits = self.gan_loss.generator_loss(self.disc_module, out["z_hat"], out["prompt"],
                                                                 gan_inputs)
                terms["gan"] = g_gan
                logs["g/logits_fake"] = float(logits.detach().float().mean())
            loss = LossBundle.combine(terms, self.weights)
            acc.backward(loss.total * loss_scale)
        logs.update(loss.detached("g/"))
        logs["g_total"] = logs.pop("g/total")
        return out, logs

    # --------------------------------------------------------------------------- the D step
    def discriminator_step(self, batch: dict[str, Any], out: dict[str, torch.Tensor], loss_scale: float,
                           rng: torch.Generator, gan_inputs) -> dict[str, float]:
        """Non-saturating D loss on ``z_H = E_vae(gt)`` vs the detached ``ẑ_H``, and backward."""
        acc = self.accelerator
        with torch.no_grad():
            z_real = self.pipe.encode_latent(to_model_range(batch["gt"]).to(self.pipe.vae.dtype),
                                             latent=self.cfg.model.latent, generator=rng).float()
        with acc.autocast():
            d_loss, real, fake = self.gan_loss.discriminator_loss(self.disc, z_real, out["z_hat"].float(),
                                                                  out["prompt"], gan_inputs)
        acc.backward(d_loss * loss_scale)
        real, fake = real.detach().float(), fake.detach().float()
        return {"d/loss": float(d_loss.detach()), "d/logits_real": float(real.mean()),
                "d/logits_fake": float(fake.mean()),
                "d/accuracy": float(((real > 0).float().mean() + (fake < 0).float().mean()) / 2)}

    def gan_inputs(self, batch: dict[str, Any], step: int):
        """``t`` and ``ε`` of this step, shared by the G step's fake and the D step's real and fake.

        Drawn per *sample* from ``(seed, step, dataset index)``, so they do not depend on how the
        batch is split over processes or micro-batches (a 2-process run equals a 1-process run with
        twice the batch) and a resumed run redraws them identically.
        """
        from ..losses.gan_latent import LatentGANInputs

        d, vae = self.cfg.model.discriminator, self.pipe.vae
        b, side = batch["lq"].shape[0], batch["lq"].shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
        index = batch.get("index")
        keys = index.tolist() if torch.is_tensor(index) else [
            f"r{self.accelerator.process_index}m{self._micro}b{j}" for j in range(b)]
        ts, noise = [], []
        for key in keys:
            g = seeded_generator(self.cfg.train.seed, step, key)
            ts.append(torch.randint(d.t_min, d.t_max + 1, (1,), generator=g))
            noise.append(torch.randn(1, vae.config.latent_channels, side, side, generator=g))
        dev = batch["lq"].device
        return LatentGANInputs(torch.cat(ts).to(dev), torch.cat(noise).to(dev))

    def train_micro_step(self, batch, step, loss_scale):
        # VAE posterior samples (model.latent=sample) come from a per-(step, micro-batch, process) stream
        rng = seeded_generator(self.cfg.train.seed, step, self._micro, self.accelerator.process_index)
        gan_inputs = self.gan_inputs(batch, step) if self.gan_active(step) else None
        self._micro += 1
        out, logs = self.generator_step(batch, step, loss_scale, rng, gan_inputs)
        if self.d_update(step):
            logs.update(self.discriminator_step(batch, out, loss_scale, rng, gan_inputs))
        return logs

    def _lr_factor(self, step: int) -> float:
        w = self.cfg.optim.warmup_steps
        return min(1.0, (step + 1) / w) if w > 0 else 1.0

    def optimizer_step(self, step: int) -> None:
        acc, o = self.accelerator, self.cfg.optim
        f = self._lr_factor(step)
        self._micro = 0
        for g in self.opt_g.param_groups:
            g["lr"] = self.base_lr * f
        if o.grad_clip > 0:
            acc.clip_grad_norm_([p for p in self.gen.parameters() if p.requires_grad], o.grad_clip)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.d_update(step):
            for g in self.opt_d.param_groups:
                g["lr"] = self.base_disc_lr * f
            if o.grad_clip > 0:
                acc.clip_grad_norm_([p for p in self.disc.parameters() if p.requires_grad], o.grad_clip)
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)

    def ddp_modules(self):
        return [m for m in (self.gen, self.disc) if m is not None]

    def checkpoint_modules(self):
        g = self.gen_module
        mods: dict[str, Any] = {"unet_lora": LoraFolder(g.unet), "prompt_adapter": g.prompt_adapter,
                                "vre": self.pipe.vre}
        if self.disc is not None:
            mods["discriminator"] = DiscriminatorFolder(self.disc_module)
        return mods

    def learning_rates(self):
        out = {"generator": self.opt_g.param_groups[0]["lr"]}
        if self.opt_d is not None:
            out["discriminator"] = self.opt_d.param_groups[0]["lr"]
        return out

    # ---------------------------------------------------------------------------- validation
    def _metrics(self) -> dict[str, Any]:
        if self._val_metrics is None:
            from ..evaluation import create_metric

            v = self.cfg.val
            self._val_metrics = {name: create_metric(name, device=self.accelerator.device, pretrained=v.pretrained,
                                                     weights_dir=v.weights_dir) for name in v.metrics}
        return self._val_metrics

    @torch.no_grad()
    def validate(self, batches):
        """Restore the fixed validation faces; PSNR, MSE and the configured metrics; LQ/restored/GT grid."""
        g = self.gen_module
        metrics = self._metrics()
        values: dict[str, list[float]] = {}
        grids = []
        for batch in batches:
            lq, gt = batch["lq"], batch["gt"].float()
            with self.accelerator.autocast():
                pred = g(lq)["pred"].float()
            mse = ((pred - gt) ** 2).flatten(1).mean(1)  # (B,) in [0, 1] units
            values.setdefault("mse", []).extend(mse.tolist())
            values.setdefault("psnr", []).extend((10 * torch.log10(1.0 / mse.clamp(min=1e-10))).tolist())
            for name, metric in metrics.items():
                values.setdefault(name, []).extend(metric(pred, gt).reshape(-1).tolist())
            grids.append(torch.stack([lq.float(), pred, gt], 1).flatten(0, 1).cpu())  # (3B, 3, H, W)
        scalars = {}
        for name, vals in values.items():
            agg = getattr(metrics.get(name), "aggregate", None)  # e.g. the identity angle's VQFR rule
            scalars[name] = float(agg(vals)) if agg is not None else sum(vals) / max(len(vals), 1)
        return scalars, {"lq_restored_gt": torch.cat(grids)} if grids else {}

    # -------------------------------------------------------------------------------- export
    def export(self, out_dir: Path) -> list[Path]:
        """The three files of the official release layout (usable by the official ``infer.py``)."""
        g = self.gen_module
        return write_official_layout_files(self.pipe.vre, g.prompt_adapter, LoraFolder(g.unet).state_dict(), out_dir)


# ---------------------------------------------------------------------------------- export
def write_official_layout_files(vre: VisualPromptEncoder, adapter: PromptAdapter, lora: dict[str, torch.Tensor],
                                out_dir: str | os.PathLike) -> list[Path]:
    """Write ``associate_2.ckpt``, ``embedding_change_weights.pth`` and ``pytorch_lora_weights.safetensors``.

    * ``associate_2.ckpt``: ``{"state_dict": {"vqvae_LQ.<VRE key>": tensor}}`` — plain tensors, loads
      with ``torch.load(weights_only=True)`` and the official prefix filter;
    * ``embedding_change_weights.pth``: the adapter's plain 4-tensor state dict;
    * ``pytorch_lora_weights.safetensors``: PEFT keys ``unet.<module>.lora_A.weight`` / ``lora_B``.

    All three are written to temporaries first and renamed only when all three succeeded.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / OFFICIAL_VRE_NAME, out / OFFICIAL_ADAPTER_NAME, out / OFFICIAL_LORA_NAME]
    with contextlib.ExitStack() as stack:
        tmp_vre, tmp_adapter, tmp_lora = (stack.enter_context(atomic_path(p)) for p in paths)
        torch.save({"state_dict": {f"vqvae_LQ.{k}": v.detach().float().cpu().clone()
                                   for k, v in vre.state_dict().items()}}, tmp_vre)
        torch.save({k: v.detach().float().cpu().clone() for k, v in adapter.state_dict().items()}, tmp_adapter)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in lora.items()}, str(tmp_lora),
                  metadata={"format": "pt"})
        normalize_permissions(out, [tmp_vre, tmp_adapter, tmp_lora])  # safetensors writes 0600
    logger.info("wrote the official layout to %s", out)
    return paths


def export_generator(run_or_checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                     base_model: str | os.PathLike | None = None, fuse_lora: bool = True,
                     official_dir: str | os.PathLike | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Turn a stage-2 checkpoint (or the latest of a run) into deliverables.

    Args:
        run_or_checkpoint: a run folder or one of its ``checkpoints/step-*`` folders.
        out_dir: model folder for ``OSDFacePipeline.from_pretrained`` / ``osdface restore --model``.
        base_model: the SD 2.1-base folder (default: the run's ``model.base_model``).
        fuse_lora: merge the LoRA into the UNet (default) or keep ``unet_lora/``.
        official_dir: also write the three official release files there.
        dtype: stored precision of the model folder (``fp32`` default, ``fp16``, ``bf16``).

    Everything is read and checked before anything is written; the official files are refused
    where such files already exist (they could be the release the run started from).

    Returns:
        ``{"checkpoint", "model", "official"}`` (paths, ``None`` where not written).

    Raises:
        WeightsNotFoundError: no checkpoint, a missing component, or no base model.
        ModelFileError: a corrupt, incomplete or implausible checkpoint or base model (named).
        OutputPathError: ``official_dir`` already holds official-layout files.
    """
    from ..errors import OutputPathError
    from ..io.model_folders import apply_lora, official_layout_taken, read_lora_folder, write_official_layout
    from ..io.names import LORA_SUBFOLDER, PROMPT_ADAPTER, VRE
    from ..model_limits import check_adapter_config
    from ..pipelines.pipeline_osdface import OSDFacePipeline

    ckpt = resolve_checkpoint(run_or_checkpoint)
    missing = [n for n in (LORA_SUBFOLDER, PROMPT_ADAPTER, VRE) if not (ckpt / n).is_dir()]
    if missing:
        hint = " (a stage-1 run? its VRE is in RUN/export/vre)" if (ckpt / "vqgan_lq").is_dir() else ""
        raise WeightsNotFoundError(f"{ckpt} is not a stage-2 generator checkpoint: missing "
                                   f"{', '.join(missing)}/{hint}")
    if official_dir is not None:
        taken = official_layout_taken(official_dir)
        if taken:
            raise OutputPathError(f"{official_dir} already holds {', '.join(taken)}; choose another folder for "
                                  "--official-layout (existing release files are never overwritten)")
    cfg = load_generator_config(ckpt / "config.yaml")
    lora = read_lora_folder(ckpt / LORA_SUBFOLDER)
    vre = load_vre_folder(ckpt / VRE)
    adapter = load_module_folder(PromptAdapter, ckpt / PROMPT_ADAPTER, "prompt adapter", check=check_adapter_config)
    pipe = None
    if out_dir is not None:
        base = base_model or cfg.model.base_model
        if not base:
            raise WeightsNotFoundError(f"{ckpt}: the run records no base model; pass --base-model SD_DIR")
        parts = load_base_model(base)
        unet = parts["unet"]
        apply_lora(unet, lora, fuse_lora)
        pipe = OSDFacePipeline(parts["vae"], unet, vre, adapter, parts["scheduler"], timestep=cfg.model.timestep)
        if dtype not in (None, "fp32"):
            pipe.to(dtype=dtype)
    result: dict[str, Any] = {"checkpoint": ckpt, "model": None, "official": None}
    if pipe is not None:  # first: the CLI writes it into a temporary folder that a later error removes
        result["model"] = pipe.save_pretrained(out_dir, fuse_lora=fuse_lora)
        normalize_permissions(out_dir)
        logger.info("exported %s to %s", ckpt, out_dir)
    if official_dir is not None:
        result["official"] = write_official_layout(vre, adapter, lora.state_dict, official_dir)
    return result


# ----------------------------------------------------------------------------------- entry
def build_dataset(cfg: GeneratorExperiment, roots: Sequence[str | os.PathLike]):
    """The on-the-fly degraded face dataset of ``osdface.data`` (FFHQ, FFHQR or any face folders); an
    undecodable image is skipped and replaced (the trainer logs the count)."""
    from ..data.datasets import DegradedFaceDataset

    return DegradedFaceDataset(list(roots), degradation=cfg.data.degradation, size=cfg.data.size,
                               hflip=cfg.data.hflip, seed=cfg.train.seed, undecodable="replace")


def _as_dataset(cfg: GeneratorExperiment, data):
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return build_dataset(cfg, [data])
    if isinstance(data, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in data):
        return build_dataset(cfg, data)
    return data


def train_generator(cfg: GeneratorExperiment, data: Sequence[str | os.PathLike] | Any, run_dir: str | os.PathLike,
                    val_data: Sequence[str | os.PathLike] | Any | None = None, resume: bool = False,
                    cpu: bool = False, components: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run stage 2.

    Args:
        cfg: the experiment (``model.base_model`` and ``model.vre``/``model.weights`` name the inputs).
        data: HQ face folders, or a dataset with items ``{"lq", "gt": (3, H, W) in [0, 1]}``.
        run_dir: output folder (``checkpoints/``, ``logs/``, ``log.jsonl``, ``export/``).
        val_data: validation folders or dataset (default: the first training items at epoch 0).
        resume: continue from the latest checkpoint in ``run_dir``.
        cpu: force the CPU.
        components: pre-built components instead of reading files (see :class:`GeneratorTask`).

    Returns:
        ``{"step", "checkpoint", "export"}`` (``export``: the official-layout files in ``RUN/export``).
    """
    trainer = Trainer(cfg.train, GeneratorTask(cfg, components), _as_dataset(cfg, data), run_dir,
                      resolved_config=dump_yaml(cfg), val_dataset=_as_dataset(cfg, val_data),
                      num_workers=cfg.data.num_workers, val_images=cfg.data.val_images, resume=resume, cpu=cpu)
    return trainer.fit()


__all__ = [
    "GeneratorExperiment", "GeneratorModelConfig", "GeneratorLoraConfig", "LatentDiscriminatorConfig",
    "GeneratorLossConfig", "GeneratorOptimConfig", "GeneratorValConfig", "GeneratorTask", "OneStepGenerator",
    "load_generator_config", "load_components", "load_vre", "build_generator", "train_generator",
    "export_generator", "write_official_layout_files", "load_discriminator", "frozen",
]
