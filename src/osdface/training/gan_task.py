"""What both training stages share: a generator and a discriminator trained in alternation.

Stage 1 (:class:`~osdface.training.vre.VRETask`: VQ-GANs + PatchGANs) and stage 2
(:class:`~osdface.training.generator_task.GeneratorTask`: UNet LoRA + latent discriminator) are both
*G step with D frozen, then D step* per micro-batch, and one optimiser step per model per
training step. :class:`GANTask` holds that shape once:

* :meth:`GANTask.prepare` — ``accelerator.prepare`` of ``gen``/``opt_g`` and, when there is one,
  ``disc``/``opt_d``; :attr:`GANTask.gen_module` / :attr:`GANTask.disc_module` unwrap them;
* :meth:`GANTask.optimizer_step` — both rates set from ``base_lr``/``base_disc_lr`` times the
  stage's :meth:`GANTask.lr_factor`, gradient-norm clipping of the trainable tensors, step,
  zero; the discriminator only on steps where :meth:`GANTask.d_update` is true;
* :func:`frozen` — the one idiom for "discriminator frozen during the G step";
* :func:`build_dataset` / :func:`as_dataset` — HQ folders → the on-the-fly degraded dataset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .trainer import TrainingTask


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Switch every parameter of ``module`` to ``requires_grad=False``; restore each flag afterwards.

    Used for the discriminator during the generator step: the generator's loss back-propagates
    *through* it without accumulating gradients in it.
    """
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


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require grad (what its optimiser updates and clipping sees)."""
    return [p for p in module.parameters() if p.requires_grad]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0: ``min(1, (step + 1) / warmup_steps)`` (``1`` when ``warmup_steps`` is 0)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def milestone_factor(step: int, milestones: Sequence[int], gamma: float) -> float:
    """Step schedule: ``gamma ** (number of milestones ≤ step)``."""
    return gamma ** sum(step >= m for m in milestones)


class GANTask(TrainingTask):
    """A :class:`~osdface.training.trainer.TrainingTask` with a generator and an optional discriminator.

    Subclasses build their models and optimisers, call :meth:`prepare`, set ``base_lr`` and
    ``base_disc_lr``, and define :meth:`lr_factor` (the schedule), :meth:`d_update` (whether the
    discriminator is updated at a step) and ``grad_clip`` (max gradient norm, ``0`` = off).
    """

    accelerator: Any
    gen: nn.Module
    opt_g: torch.optim.Optimizer
    disc: nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    base_lr: float
    base_disc_lr: float

    def prepare(self, gen: nn.Module, opt_g: torch.optim.Optimizer, disc: nn.Module | None = None,
                opt_d: torch.optim.Optimizer | None = None) -> None:
        """``accelerator.prepare`` the models and optimisers (the discriminator pair only when given)."""
        if disc is not None:
            self.gen, self.opt_g, self.disc, self.opt_d = self.accelerator.prepare(gen, opt_g, disc, opt_d)
        else:
            self.gen, self.opt_g = self.accelerator.prepare(gen, opt_g)
            self.disc = self.opt_d = None

    # ------------------------------------------------------------------------------ helpers
    @property
    def gen_module(self) -> nn.Module:
        """The generator without its DDP/accelerate wrapper."""
        return self.accelerator.unwrap_model(self.gen)

    @property
    def disc_module(self) -> nn.Module | None:
        """The discriminator without its wrapper (``None`` when the run has none)."""
        return None if self.disc is None else self.accelerator.unwrap_model(self.disc)

    # ----------------------------------------------------------------------------- schedule
    @property
    def grad_clip(self) -> float:
        """Max gradient norm per model (``0`` = off)."""
        raise NotImplementedError

    def lr_factor(self, step: int) -> float:
        """Multiplier of both base learning rates at ``step``."""
        raise NotImplementedError

    def d_update(self, step: int) -> bool:
        """Whether the discriminator takes a step (and its loss is computed) at ``step``."""
        raise NotImplementedError

    def optimizer_step(self, step: int) -> None:
        f = self.lr_factor(step)
        self._step(self.gen, self.opt_g, self.base_lr * f)
        if self.d_update(step):
            self._step(self.disc, self.opt_d, self.base_disc_lr * f)

    def _step(self, model: nn.Module, opt: torch.optim.Optimizer, lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr
        if self.grad_clip > 0:
            self.accelerator.clip_grad_norm_(trainable(model), self.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ddp_modules(self):
        return [m for m in (self.gen, self.disc) if m is not None]

    def learning_rates(self):
        out = {"generator": self.opt_g.param_groups[0]["lr"]}
        if self.opt_d is not None:
            out["discriminator"] = self.opt_d.param_groups[0]["lr"]
        return out


# ------------------------------------------------------------------------------------- data
def build_dataset(cfg: Any, roots: Sequence[str | os.PathLike]):
    """The on-the-fly degraded face dataset of ``osdface.data`` (FFHQ, FFHQR or any face folders),
    configured by an experiment's ``data`` section and ``train.seed``; an undecodable image is
    skipped and replaced (the trainer logs the count)."""
    from ..data.datasets import DegradedFaceDataset

    return DegradedFaceDataset(list(roots), degradation=cfg.data.degradation, size=cfg.data.size,
                               hflip=cfg.data.hflip, seed=cfg.train.seed, undecodable="replace")


def as_dataset(cfg: Any, data):
    """``None``, one folder or a list of folders (→ :func:`build_dataset`), or a dataset (returned as is)."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return build_dataset(cfg, [data])
    if isinstance(data, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in data):
        return build_dataset(cfg, data)
    return data


__all__ = ["GANTask", "frozen", "trainable", "warmup_factor", "milestone_factor", "build_dataset", "as_dataset"]
