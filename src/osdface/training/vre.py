"""Stage 1: train the HQ/LQ VQ-GANs and their association; export the VRE (docs/method.md §5).

Phases (``phase`` in the experiment config):

* ``hq``: HQ VQ-GAN reconstructing the HQ face (``gt``).
* ``lq``: LQ VQ-GAN reconstructing the LQ face itself (λ_assoc = 0: no HQ branch at all).
* ``assoc``: both branches (initialised from the first two phases) trained jointly, each with
  its own reconstruction/VQ/GAN losses, plus λ_assoc · the association loss between the HQ and
  LQ pre-quantisation features (DAEFR's association stage).

Per branch (``x`` its input, ``x̂`` its reconstruction, both in model space [-1, 1]):
``L = λ_l1·|x − x̂| + λ_lpips·LPIPS + λ_vq·L_VQ + λ_adapt·L_G``, where
``λ_adapt = λ_gan · ‖∇L_rec‖/‖∇L_G‖`` at the decoder's last layer (taming/DAEFR) and the GAN
terms start at ``loss.disc_start``; the discriminator (PatchGAN) uses the hinge loss. The G step
and the D step are separate functions; the discriminators are frozen during the G step.

The VRE is the LQ encoder + LQ dictionary: :func:`export_vre` writes it as a
:class:`~osdface.models.VisualPromptEncoder` folder and in the official ``associate_2.ckpt`` layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelFileError, WeightsNotFoundError
from ..image import from_model_range, to_model_range
from ..io.names import CONFIG_NAME
from ..losses.adversarial import GANLoss, adaptive_gan_weight
from ..losses.association import CLIP_LOGIT_SCALE_INIT, AssociationLoss
from ..losses.bundle import LossBundle, build_loss
from ..losses.vq import VQLoss, codebook_usage
from ..models.discriminator import NLayerDiscriminator
from ..models.vqgan import VQAutoencoder
from ..utils.io import atomic_path, normalize_permissions
from ..utils.logging import get_logger
from ..weights import OFFICIAL_VRE_FILE
from .checkpoint import WEIGHTS_NAME, load_extra_tensors, resolve_checkpoint
from .config import ConfigError, DataConfig, TrainConfig, check_bounds, check_value, dump_yaml, load_config
from .gan_task import GANTask, as_dataset, frozen, milestone_factor
from .trainer import Trainer

logger = get_logger(__name__)

Phase = Literal["hq", "lq", "assoc"]
OFFICIAL_VRE_NAME = OFFICIAL_VRE_FILE


# ------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of each VQ autoencoder (both branches); defaults = the released VRE (docs/method.md §2.2)."""

    n_embed: int = 1024
    embed_dim: int = 512
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resolution: int = 512
    z_channels: int = 512
    enable_mid: bool = True
    head_size: int = 1
    input_normalization: Literal["official", "standard"] = "official"

    def __post_init__(self) -> None:
        check_bounds(self, "model.vqgan")
        check_value("model.vqgan.ch × max(ch_mult)", self.ch * max(self.ch_mult), section="model.vqgan")
        widths = sorted({self.ch * m for m in (1, *self.ch_mult)})
        if any(w % 32 for w in widths):  # taming's 32-group GroupNorm on every level
            raise ConfigError(f"model.vqgan: the channel widths ch × ch_mult = {widths} must all be multiples of 32 "
                              "(32-group normalisation)", key="model.vqgan")
        if any(w % self.head_size for w in widths):
            raise ConfigError(f"model.vqgan.head_size {self.head_size} must divide every channel width {widths}",
                              key="model.vqgan")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % factor:
            raise ConfigError(f"model.vqgan.resolution {self.resolution} must be divisible by 2^(len(ch_mult) - 1) = "
                              f"{factor}", key="model.vqgan")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN (taming/DAEFR: ndf 64, 3 layers, BatchNorm)."""

    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "group", "none"] = "batch"

    def __post_init__(self) -> None:
        check_bounds(self, "model.discriminator")


@dataclass(frozen=True)
class VREModelConfig:
    """Models of stage 1.

    Attributes:
        vqgan / discriminator: architectures.
        num_tokens: prompt length of the exported VRE (77).
        init_hq / init_lq: a checkpoint or run folder of an earlier phase (or a ``VQAutoencoder``
            folder) to start the HQ / LQ branch from (with its discriminator when present).
        train_hq: in the ``assoc`` phase, also update the HQ branch (DAEFR) or keep it frozen.
    """

    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    num_tokens: int = 77
    init_hq: str | None = None
    init_lq: str | None = None
    train_hq: bool = True

    def __post_init__(self) -> None:
        check_bounds(self, "model")


@dataclass(frozen=True)
class VRELossConfig:
    """Loss weights and options (DAEFR values by default)."""

    l1: float = 1.0
    lpips: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_pretrained: bool = True
    vq: float = 1.0
    vq_beta: float = 0.25
    gan: float = 0.8
    gan_kind: Literal["hinge", "non_saturating", "lsgan"] = "hinge"
    adaptive_gan_weight: bool = True
    disc_start: int = 30001
    assoc: float = 1.0
    assoc_logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    assoc_learnable_scale: bool = True

    def __post_init__(self) -> None:
        check_bounds(self, "loss")


@dataclass(frozen=True)
class OptimConfig:
    """Adam for the autoencoders (+ logit scale) and for the discriminators.

    Attributes:
        lr: learning rate, or the base rate when ``scale_lr`` (DAEFR: ``lr = base × processes ×
            batch × grad_accum``).
        disc_lr: discriminator rate (same rule; ``None`` = ``lr``).
        lr_milestones / lr_gamma: multiply the rates by ``gamma`` at these steps.
        grad_clip: max gradient norm (``0`` = off).
    """

    lr: float = 4.5e-6
    disc_lr: float | None = None
    scale_lr: bool = True
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        check_bounds(self, "optim")


@dataclass(frozen=True)
class VREExperiment:
    """A stage-1 experiment (one phase)."""

    phase: Phase = "hq"
    model: VREModelConfig = field(default_factory=VREModelConfig)
    loss: VRELossConfig = field(default_factory=VRELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_vre_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> VREExperiment:
    """YAML file + ``key.sub=value`` overrides → :class:`VREExperiment` (unknown keys raise)."""
    return load_config(VREExperiment, path, overrides)


# ------------------------------------------------------------------------------ models
def build_vqgan(cfg: VQGANConfig) -> VQAutoencoder:
    return VQAutoencoder(
        n_embed=cfg.n_embed, embed_dim=cfg.embed_dim, ch=cfg.ch, ch_mult=cfg.ch_mult,
        num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout,
        resolution=cfg.resolution, z_channels=cfg.z_channels, enable_mid=cfg.enable_mid,
        head_size=cfg.head_size, input_normalization=cfg.input_normalization,
    )


def _load_into(module: nn.Module, folder: Path) -> None:
    """Load the weights of a ``save_pretrained`` folder into ``module`` (built from the experiment config).

    The folder's ``config.json`` is compared with the module's config first, so a folder of another
    (or an absurd) architecture is refused before any of its tensors are read; the weights are read
    as safetensors, their keys and shapes checked (:func:`osdface.io.state_dicts.load_checked`) and
    loaded strictly.

    Raises:
        WeightsNotFoundError: no config or weights file.
        ModelFileError: naming the file: malformed config, another architecture, or tensors that do not fit.
    """
    from ..io.state_dicts import load_checked
    from ..model_limits import read_config
    from ..safe_load import load_safetensors

    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise WeightsNotFoundError(f"{config_file}: model config not found")
    theirs = read_config(config_file, "model config")
    ours = dict(module.config)
    diff = sorted(k for k in ours if not k.startswith("_") and k in theirs
                  and list(_aslist(ours[k])) != list(_aslist(theirs[k])))
    if diff:
        raise ModelFileError(f"{config_file}: architecture differs from the experiment config in {diff} "
                             f"(config {[ours[k] for k in diff]}, folder {[theirs[k] for k in diff]})")
    sd = load_safetensors(folder / WEIGHTS_NAME, what="model")
    load_checked(module, sd, folder / WEIGHTS_NAME, f"the weights of the architecture in {config_file.name}")


def _aslist(v):
    return v if isinstance(v, (list, tuple)) else [v]


def init_branch(path: str, branch: str, vqgan: VQAutoencoder, disc: NLayerDiscriminator | None) -> None:
    """Load branch ``hq``/``lq`` weights from a checkpoint/run folder or a bare ``VQAutoencoder`` folder."""
    p = Path(path).expanduser()
    if (p / CONFIG_NAME).is_file():
        _load_into(vqgan, p)
        logger.info("%s branch initialised from %s", branch, p)
        return
    if not p.exists():
        raise WeightsNotFoundError(f"model.init_{branch}: {p} does not exist (give a stage-1 run folder, one of its "
                                   f"checkpoints, or a VQAutoencoder folder)")
    ckpt = resolve_checkpoint(p)
    sub = ckpt / f"vqgan_{branch}"
    if not sub.is_dir():
        raise WeightsNotFoundError(f"model.init_{branch}: {ckpt} has no vqgan_{branch}/ (was it trained in phase "
                                   f"'{branch}' or 'assoc'?)")
    _load_into(vqgan, sub)
    if disc is not None and (ckpt / f"disc_{branch}").is_dir():
        _load_into(disc, ckpt / f"disc_{branch}")
    logger.info("%s branch initialised from %s", branch, ckpt)


class VQGANPair(nn.Module):
    """The trainable generator side: ``vqgan_hq`` and/or ``vqgan_lq`` and the association loss
    (its logit scale is a parameter). One ``forward`` so DDP sees a single module."""

    def __init__(self, hq: VQAutoencoder | None, lq: VQAutoencoder | None, assoc: AssociationLoss | None):
        super().__init__()
        self.vqgan_hq, self.vqgan_lq, self.assoc = hq, lq, assoc

    def branches(self) -> dict[str, VQAutoencoder]:
        return {k: m for k, m in (("hq", self.vqgan_hq), ("lq", self.vqgan_lq)) if m is not None}

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs``: branch → ``(B, 3, R, R)`` model-space images. Returns flat tensors
        ``{branch}_recon/_h/_codes/_indices`` and ``assoc`` (when both branches and the loss exist)."""
        out: dict[str, torch.Tensor] = {}
        for name, model in self.branches().items():
            frozen = not any(p.requires_grad for p in model.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                o = model(inputs[name])
            out.update({f"{name}_recon": o.recon, f"{name}_h": o.h, f"{name}_codes": o.codes,
                        f"{name}_indices": o.indices})
        if self.assoc is not None and "hq_h" in out and "lq_h" in out:
            out["assoc"] = self.assoc(out["hq_h"], out["lq_h"])
        return out


class DiscriminatorPair(nn.Module):
    """Discriminators ``disc_hq`` / ``disc_lq``; ``forward`` scores reals and (detached) fakes."""

    def __init__(self, discs: dict[str, NLayerDiscriminator]):
        super().__init__()
        self.discs = nn.ModuleDict({f"disc_{k}": d for k, d in discs.items()})

    def get(self, branch: str) -> NLayerDiscriminator:
        return self.discs[f"disc_{branch}"]

    def forward(self, real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, disc in self.discs.items():
            b = key[len("disc_"):]
            out[f"{b}_real"], out[f"{b}_fake"] = disc(real[b]), disc(fake[b])
        return out


# -------------------------------------------------------------------------------- task
class VRETask(GANTask):
    """The stage-1 model/loss step for one phase (see the module docstring); the optimiser step,
    unwrapping and freezing come from :class:`~osdface.training.gan_task.GANTask`."""

    def __init__(self, cfg: VREExperiment):
        self.cfg = cfg
        self.phase = cfg.phase
        self._usage: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------------------- build
    def build(self, accelerator) -> None:
        cfg, m = self.cfg, self.cfg.model
        self.accelerator = acc = accelerator
        want = {"hq": ("hq",), "lq": ("lq",), "assoc": ("hq", "lq")}[self.phase]
        vqgans = {b: build_vqgan(m.vqgan) for b in want}
        use_gan = cfg.loss.gan > 0
        discs = {b: NLayerDiscriminator(3, m.discriminator.ndf, m.discriminator.n_layers, m.discriminator.norm)
                 for b in want} if use_gan else {}
        for b in want:
            init = getattr(m, f"init_{b}")
            if init:
                init_branch(init, b, vqgans[b], discs.get(b))
            elif self.phase == "assoc":
                logger.warning("phase 'assoc' without model.init_%s: the %s branch starts from scratch", b, b)
        if self.phase != "assoc" and (m.init_hq if self.phase == "lq" else m.init_lq):
            logger.warning("phase %r ignores model.init_%s", self.phase, "hq" if self.phase == "lq" else "lq")
        self.trainable = [b for b in want if not (b == "hq" and self.phase == "assoc" and not m.train_hq)]
        for b in want:
            vqgans[b].train()
            if b not in self.trainable:
                vqgans[b].requires_grad_(False)
                discs.pop(b, None)
        assoc = None
        if self.phase == "assoc":
            assoc = AssociationLoss(cfg.loss.assoc_logit_scale_init, learnable=cfg.loss.assoc_learnable_scale)
        gen = VQGANPair(vqgans.get("hq"), vqgans.get("lq"), assoc)
        # losses (LPIPS is a frozen network: not part of any optimiser)
        rec = {"l1": build_loss("l1")}
        if cfg.loss.lpips:
            rec["lpips"] = build_loss("lpips", net=cfg.loss.lpips_net, pretrained=cfg.loss.lpips_pretrained)
        self.rec_loss = LossBundle(rec, {"l1": cfg.loss.l1, "lpips": cfg.loss.lpips}).to(acc.device)
        self.rec_loss.requires_grad_(False).eval()
        self.vq_loss = VQLoss(cfg.loss.vq_beta)
        self.gan_loss = GANLoss(cfg.loss.gan_kind)
        # optimisers
        o = cfg.optim
        scale = acc.num_processes * cfg.train.batch_size * cfg.train.grad_accum if o.scale_lr else 1
        self.base_lr = o.lr * scale
        self.base_disc_lr = (o.disc_lr if o.disc_lr is not None else o.lr) * scale
        gen_params = [p for p in gen.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(gen_params, lr=self.base_lr, betas=o.betas, weight_decay=o.weight_decay)
        dpair = opt_d = None
        if discs:
            dpair = DiscriminatorPair(discs)
            opt_d = torch.optim.Adam(dpair.parameters(), lr=self.base_disc_lr, betas=o.betas,
                                     weight_decay=o.weight_decay)
        self.prepare(gen, opt_g, dpair, opt_d)
        logger.info("stage 1 phase %r: training %s; %.2f M generator and %.2f M discriminator parameters; "
                    "lr %.3g (disc %.3g)", self.phase, "+".join(self.trainable),
                    sum(p.numel() for p in gen_params) / 1e6,
                    sum(p.numel() for p in dpair.parameters()) / 1e6 if discs else 0.0,
                    self.base_lr, self.base_disc_lr)

    # ----------------------------------------------------------------------- helpers
    def _inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Branch → model-space input (= reconstruction target): HQ sees ``gt``, LQ sees ``lq``."""
        x = {}
        if self.gen_module.vqgan_hq is not None:
            x["hq"] = to_model_range(batch["gt"])
        if self.gen_module.vqgan_lq is not None:
            x["lq"] = to_model_range(batch["lq"])
        return x

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.loss.disc_start

    # ------------------------------------------------------------------- the G step
    def generator_step(self, inputs: dict[str, torch.Tensor], step: int, loss_scale: float
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Autoencoder losses and backward, discriminators frozen. Returns (outputs, scalars)."""
        acc, lc = self.accelerator, self.cfg.loss
        use_gan = self.gan_active(step)
        dmod = self.disc_module
        with frozen(dmod):
            with acc.autocast():
                out = self.gen(inputs)
            total = 0.0
            logs: dict[str, float] = {}
            for b in self.trainable:
                x, xr = inputs[b], out[f"{b}_recon"]
                rec = self.rec_loss(xr.float(), x.float())  # model space; LPIPS maps to [0, 1] itself
                vq = self.vq_loss(out[f"{b}_codes"].float(), out[f"{b}_h"].float())
                branch_total = rec.total + lc.vq * vq
                logs.update(rec.detached(f"{b}/rec_"))
                logs[f"{b}/vq"] = float(vq.detach())
                if use_gan:
                    with acc.autocast():
                        logits = dmod.get(b)(xr)
                    g_loss = self.gan_loss.generator(logits.float())
                    if lc.adaptive_gan_weight:
                        last = getattr(self.gen_module, f"vqgan_{b}").last_layer
                        lam = adaptive_gan_weight(rec.total, g_loss, last) * lc.gan
                    else:
                        lam = torch.tensor(lc.gan, device=g_loss.device)
                    branch_total = branch_total + lam * g_loss
                    logs[f"{b}/g_loss"] = float(g_loss.detach())
                    logs[f"{b}/gan_weight"] = float(lam)
                logs[f"{b}/total"] = float(branch_total.detach())
                total = total + branch_total
                self._count_codes(b, out[f"{b}_indices"])
            if "assoc" in out:
                total = total + lc.assoc * out["assoc"]
                logs["assoc/loss"] = float(out["assoc"].detach())
                logs["assoc/logit_scale"] = float(self.gen_module.assoc.logit_scale.detach().exp())
            logs["g_total"] = float(total.detach())
            acc.backward(total * loss_scale)
        return out, logs

    # ------------------------------------------------------------------- the D step
    def discriminator_step(self, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                           loss_scale: float) -> dict[str, float]:
        """Hinge (or configured) D loss on reals vs detached reconstructions, and backward."""
        acc = self.accelerator
        real = {b: inputs[b].detach() for b in self.trainable}
        fake = {b: out[f"{b}_recon"].detach() for b in self.trainable}
        with acc.autocast():
            logits = self.disc(real, fake)
        logs, total = {}, 0.0
        for b in self.trainable:
            r, f = logits[f"{b}_real"].float(), logits[f"{b}_fake"].float()
            d = self.gan_loss.discriminator(r, f)
            logs[f"{b}/d_loss"] = float(d.detach())
            logs[f"{b}/logits_real"] = float(r.detach().mean())
            logs[f"{b}/logits_fake"] = float(f.detach().mean())
            total = total + d
        acc.backward(total * loss_scale)
        return logs

    def train_micro_step(self, batch, step, loss_scale):
        inputs = self._inputs(batch)
        out, logs = self.generator_step(inputs, step, loss_scale)
        if self.gan_active(step):
            logs.update(self.discriminator_step(inputs, out, loss_scale))
        return logs

    # the schedule of GANTask.optimizer_step
    @property
    def grad_clip(self) -> float:
        return self.cfg.optim.grad_clip

    def lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        return milestone_factor(step, o.lr_milestones, o.lr_gamma)

    def d_update(self, step: int) -> bool:
        return self.gan_active(step)

    def checkpoint_modules(self):
        g, d = self.gen_module, self.disc_module
        mods = {f"vqgan_{b}": m for b, m in g.branches().items()}
        if d is not None:
            mods.update({k: v for k, v in d.discs.items()})
        return mods

    def extra_tensors(self):
        g = self.gen_module
        return {"logit_scale": g.assoc.logit_scale.detach()} if g.assoc is not None else {}

    # ------------------------------------------------------------------- statistics
    def _count_codes(self, branch: str, indices: torch.Tensor) -> None:
        n = getattr(self.gen_module, f"vqgan_{branch}").config.n_embed
        counts = torch.bincount(indices.detach().reshape(-1), minlength=n).cpu()
        self._usage[branch] = self._usage.get(branch, torch.zeros(n, dtype=torch.long)) + counts

    def pop_interval_stats(self) -> dict[str, float]:
        out = {}
        for b, counts in self._usage.items():
            idx = torch.repeat_interleave(torch.arange(len(counts)), counts)
            u = codebook_usage(idx, len(counts))
            out[f"{b}/codebook_perplexity"] = u["perplexity"]
            out[f"{b}/codebook_usage"] = u["usage"]
        self._usage = {}
        return out

    @torch.no_grad()
    def validate(self, batches):
        g = self.gen_module
        was_training = g.training
        g.eval()
        sums: dict[str, float] = {}
        n = 0
        indices: dict[str, list[torch.Tensor]] = {}
        grids: dict[str, list[torch.Tensor]] = {}
        try:
            for batch in batches:
                inputs = self._inputs(batch)
                with self.accelerator.autocast():
                    out = g(inputs)
                bsz = next(iter(inputs.values())).shape[0]
                n += bsz
                for b in g.branches():
                    x = from_model_range(inputs[b].float()).clamp(0, 1)
                    xr = from_model_range(out[f"{b}_recon"].float()).clamp(0, 1)
                    mse = ((x - xr) ** 2).flatten(1).mean(1)
                    sums[f"{b}/l1"] = sums.get(f"{b}/l1", 0.0) + float((x - xr).abs().flatten(1).mean(1).sum())
                    sums[f"{b}/psnr"] = sums.get(f"{b}/psnr", 0.0) + float(
                        (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).sum())
                    indices.setdefault(b, []).append(out[f"{b}_indices"].reshape(-1).cpu())
                    # (2N, 3, H, W): input, reconstruction interleaved
                    grids.setdefault(b, []).append(torch.stack([x, xr], 1).flatten(0, 1).cpu())
                if "assoc" in out:
                    sums["assoc/loss"] = sums.get("assoc/loss", 0.0) + float(out["assoc"]) * bsz
        finally:
            g.train(was_training)
        scalars = {k: v / max(n, 1) for k, v in sums.items()}
        for b, idx in indices.items():
            n_embed = getattr(g, f"vqgan_{b}").config.n_embed
            u = codebook_usage(torch.cat(idx), n_embed)
            scalars[f"{b}/codebook_perplexity"] = u["perplexity"]
            scalars[f"{b}/codebook_usage"] = u["usage"]
        return scalars, {f"{b}_input_recon": torch.cat(v) for b, v in grids.items()}

    # ------------------------------------------------------------------------ export
    def export(self, out_dir: Path) -> list[Path]:
        g = self.gen_module
        if g.vqgan_lq is None:
            logger.info("phase %r has no LQ branch: no VRE to export (the HQ VQ-GAN is in the checkpoint)",
                        self.phase)
            return []
        scale = g.assoc.logit_scale.detach() if g.assoc is not None else None
        return write_vre_export(g.vqgan_lq, out_dir, self.cfg.model.num_tokens, hq=g.vqgan_hq, logit_scale=scale)


# ------------------------------------------------------------------------------ export
def official_state_dict(lq: VQAutoencoder, hq: VQAutoencoder | None = None,
                        logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DAEFR association-stage key layout: ``vqvae_LQ.*`` (+ ``vqvae.*`` HQ, ``logit_scale``)."""
    sd = {f"vqvae_LQ.{k}": v.detach().float().cpu().clone() for k, v in lq.state_dict().items()}
    if hq is not None:
        sd.update({f"vqvae.{k}": v.detach().float().cpu().clone() for k, v in hq.state_dict().items()})
    if logit_scale is not None:
        sd["logit_scale"] = logit_scale.detach().float().cpu().clone().reshape(())
    return sd


def write_vre_export(lq: VQAutoencoder, out_dir: str | os.PathLike, num_tokens: int = 77,
                     hq: VQAutoencoder | None = None, logit_scale: torch.Tensor | None = None) -> list[Path]:
    """Write the VRE (LQ encoder + dictionary) two ways.

    * ``out_dir/vre/``: :class:`~osdface.models.VisualPromptEncoder` ``save_pretrained`` folder
      (config.json + safetensors), loadable by the pipeline;
    * ``out_dir/associate_2.ckpt``: ``{"state_dict": {"vqvae_LQ.<key>": tensor, ...}}``, a plain
      tensor dict (loads with ``torch.load(weights_only=True)`` and with
      :func:`osdface.weights.load_official_vre_state_dict`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vre = lq.to_visual_prompt_encoder(num_tokens=num_tokens)
    vre.save_pretrained(out / "vre", safe_serialization=True)
    normalize_permissions(out / "vre")  # safetensors writes 0600
    with atomic_path(out / OFFICIAL_VRE_NAME) as tmp:
        torch.save({"state_dict": official_state_dict(lq, hq, logit_scale)}, tmp)
    logger.info("exported the VRE to %s and %s", out / "vre", out / OFFICIAL_VRE_NAME)
    return [out / "vre", out / OFFICIAL_VRE_NAME]


def export_vre(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, num_tokens: int = 77) -> list[Path]:
    """Export the VRE from a stage-1 checkpoint (or run) folder that has ``vqgan_lq/``.

    The VQ-GANs are built from the checkpoint's own ``config.yaml`` (bounded like any experiment)
    and their folders must match it (see :func:`init_branch`).

    Raises:
        WeightsNotFoundError: no checkpoint, or no ``vqgan_lq/``.
        ModelFileError / ConfigError: a corrupt, incomplete or implausible checkpoint (named).
    """
    ckpt = resolve_checkpoint(checkpoint)
    if not (ckpt / "vqgan_lq").is_dir():
        raise WeightsNotFoundError(f"{ckpt} has no vqgan_lq/: export needs a phase 'lq' or 'assoc' checkpoint")
    arch = load_vre_config(ckpt / "config.yaml").model.vqgan
    lq = build_vqgan(arch)
    _load_into(lq, ckpt / "vqgan_lq")
    hq = None
    if (ckpt / "vqgan_hq").is_dir():
        hq = build_vqgan(arch)
        _load_into(hq, ckpt / "vqgan_hq")
    return write_vre_export(lq, out_dir, num_tokens, hq=hq, logit_scale=load_extra_tensors(ckpt).get("logit_scale"))


# ------------------------------------------------------------------------------ entry
def train_vre(cfg: VREExperiment, data: Sequence[str | os.PathLike] | Any, run_dir: str | os.PathLike,
              val_data: Sequence[str | os.PathLike] | Any | None = None, resume: bool = False,
              cpu: bool = False) -> dict[str, Any]:
    """Run one stage-1 phase.

    Args:
        cfg: the experiment.
        data: HQ face folders, or a dataset with items ``{"lq", "gt"}`` ((3, H, W) in [0, 1]).
        run_dir: output folder.
        val_data: validation folders or dataset (default: the training set at epoch 0).
        resume: continue from the latest checkpoint in ``run_dir``.
        cpu: force the CPU.

    Returns:
        ``{"step", "checkpoint", "export"}``.
    """
    if cfg.data.size != cfg.model.vqgan.resolution:
        raise ConfigError(f"data.size ({cfg.data.size}) must equal model.vqgan.resolution "
                          f"({cfg.model.vqgan.resolution})", key="data.size")
    trainer = Trainer(cfg.train, VRETask(cfg), as_dataset(cfg, data), run_dir, resolved_config=dump_yaml(cfg),
                      val_dataset=as_dataset(cfg, val_data), num_workers=cfg.data.num_workers, val_images=cfg.data.val_images,
                      resume=resume, cpu=cpu)
    return trainer.fit()


__all__ = [
    "VREExperiment", "VQGANConfig", "DiscriminatorConfig", "VREModelConfig", "VRELossConfig", "OptimConfig",
    "VRETask", "load_vre_config", "train_vre", "export_vre", "write_vre_export", "official_state_dict",
    "build_vqgan", "OFFICIAL_VRE_NAME",
]
