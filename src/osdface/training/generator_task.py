"""Stage 2: the one-step generator's model and training task (UNet LoRA + prompt adapter) with GAN guidance (docs/method.md §6).

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

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelFileError
from ..image import to_model_range
from ..io.names import CONFIG_NAME, LORA_SUBFOLDER
from ..losses.bundle import LossBundle, build_loss, loss_input_range
from ..models.latent_discriminator import LatentDiscriminator
from ..models.prompt_encoder import PromptAdapter
from ..utils.io import atomic_path
from ..utils.logging import get_logger
from .config import ConfigError, dump_yaml
from .gan_task import GANTask, as_dataset, build_dataset, frozen, trainable, warmup_factor
from .generator import DISC_TRAINABLE_NAME, LoraFolder, load_components, write_official_layout_files
from .generator_config import GeneratorExperiment, GeneratorLoraConfig, LatentDiscriminatorConfig
from .trainer import Trainer

logger = get_logger(__name__)


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
    from ..io.state_dicts import check_state_dict
    from ..model_limits import read_config
    from ..safe_load import load_safetensors

    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    cfg = read_config(config_file, "discriminator config")
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
    check_state_dict(sd, disc.trainable_state_dict(), folder / DISC_TRAINABLE_NAME,
                     f"the trainable tensors of the discriminator in {config_file.name}")
    disc.load_state_dict(sd, strict=False)
    return disc


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
class GeneratorTask(GANTask):
    """The stage-2 model/loss step (see the module docstring); the optimiser step, unwrapping and
    freezing come from :class:`~osdface.training.gan_task.GANTask`.

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
        # loss terms by name from the registry of osdface.losses.bundle (weight 0: not built)
        options = {
            "mse": {},
            "ea_dists": {"weights_dir": lc.weights_dir, "pretrained": lc.perceptual_pretrained},
            "identity": {"network": lc.identity_network, "weights": lc.identity_weights,
                         "weights_dir": lc.weights_dir, "pretrained": lc.identity_pretrained},
        }
        terms = {name: build_loss(name, **kw) for name, kw in options.items() if getattr(lc, name)}
        self.losses = nn.ModuleDict(terms).to(acc.device).requires_grad_(False).eval()
        self.weights = {"mse": lc.mse, "ea_dists": lc.ea_dists, "identity": lc.identity, "gan": lc.gan}
        if disc is not None:
            from ..losses.gan_latent import LatentGANLoss

            self.gan_loss = LatentGANLoss(self.pipe.scheduler.alphas_cumprod, kind=lc.gan_kind).to(acc.device)
        # optimisers (AdamW; trainable tensors only)
        o = cfg.optim
        g_params = trainable(gen)
        opt_g = torch.optim.AdamW(g_params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        opt_d = None
        if disc is not None:
            disc.train()
            opt_d = torch.optim.AdamW(trainable(disc), lr=o.disc_lr if o.disc_lr is not None else o.lr,
                                      betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.prepare(gen, opt_g, disc, opt_d)
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
            # each registered loss gets (pred, gt) in its own input range: model space or [0, 1]
            views = {"unit": lambda: (pred, gt.float()),
                     "model": lambda: (to_model_range(pred), to_model_range(gt.float()))}
            terms: dict[str, torch.Tensor] = {name: loss(*views[loss_input_range(name)]())
                                              for name, loss in self.losses.items()}
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

    # the schedule of GANTask.optimizer_step
    @property
    def grad_clip(self) -> float:
        return self.cfg.optim.grad_clip

    def lr_factor(self, step: int) -> float:
        return warmup_factor(step, self.cfg.optim.warmup_steps)

    def optimizer_step(self, step: int) -> None:
        self._micro = 0  # micro-batch counter of the next step's noise streams
        super().optimizer_step(step)

    def checkpoint_modules(self):
        g = self.gen_module
        mods: dict[str, Any] = {LORA_SUBFOLDER: LoraFolder(g.unet), "prompt_adapter": g.prompt_adapter,
                                "vre": self.pipe.vre}
        if self.disc is not None:
            mods["discriminator"] = DiscriminatorFolder(self.disc_module)
        return mods

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


# ------------------------------------------------------------------------------------ entry
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
    trainer = Trainer(cfg.train, GeneratorTask(cfg, components), as_dataset(cfg, data), run_dir,
                      resolved_config=dump_yaml(cfg), val_dataset=as_dataset(cfg, val_data),
                      num_workers=cfg.data.num_workers, val_images=cfg.data.val_images, resume=resume, cpu=cpu)
    return trainer.fit()


__all__ = [
    "GeneratorTask", "OneStepGenerator", "DiscriminatorFolder", "build_generator", "build_dataset",
    "load_discriminator", "seeded_generator", "train_generator", "frozen",
]
