"""GAN guidance in latent space (docs/method.md §6.2d, [OURS] where marked).

The discriminator sees *forward-diffused* latents, ``F(z, t) = √ᾱ_t·z + √(1−ᾱ_t)·ε`` with
``t ~ U{0, …, 999}``; in one step the real latent ``z_H`` and the fake latent ``ẑ_H`` share the
same ``t`` and ``ε`` (DFOSD's noise-aware discriminator, as quoted for OSDFace by [3P-CRAFT]):

* ``L_D = ½·[softplus(−D(F(z_H, t))) + softplus(D(F(sg[ẑ_H], t)))]``  (non-saturating BCE, ×½)
* ``L_G = softplus(−D(F(ẑ_H, t)))``  (``−log σ(D)``)

Other formulations (``hinge``, ``lsgan``) are available through :class:`osdface.losses.adversarial.GANLoss`.
The generator and discriminator objectives are separate functions; callers freeze the
discriminator for the generator objective (see :mod:`osdface.training.generator_task`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adversarial import GANKind, GANLoss


def diffuse_latents(z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
                    ) -> torch.Tensor:
    """``F(z, t) = √ᾱ_t·z + √(1−ᾱ_t)·ε`` per sample.

    Args:
        z: ``(B, C, h, w)`` latents (VAE-scaled).
        t: ``(B,)`` integer timesteps.
        noise: ``(B, C, h, w)`` standard normal ε.
        alphas_cumprod: ``(T,)`` ᾱ of the noise schedule (SD 2.1: 1000 entries).

    Returns:
        ``(B, C, h, w)`` in ``z``'s dtype; differentiable w.r.t. ``z``.
    """
    a = torch.as_tensor(alphas_cumprod, device=z.device)[t.to(z.device).long()].to(torch.float32)  # (B,)
    a = a.view(-1, *([1] * (z.ndim - 1)))
    return (a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()).to(z.dtype)


@dataclass
class LatentGANInputs:
    """The randomness shared by the real and fake branch of one step: ``t`` ``(B,)`` and ``ε``."""

    t: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def sample(cls, like: torch.Tensor, num_timesteps: int = 1000, generator: torch.Generator | None = None,
               t_min: int = 0, t_max: int | None = None) -> LatentGANInputs:
        """``t ~ U{t_min..t_max}`` (default all ``num_timesteps``) and ``ε ~ N(0, I)`` shaped like ``like``.

        Drawn on the generator's device (CPU by default) and moved to ``like``'s device, so a seeded
        CPU generator gives the same draws on any accelerator.
        """
        hi = num_timesteps - 1 if t_max is None else t_max
        dev = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(t_min, hi + 1, (like.shape[0],), generator=generator, device=dev)
        noise = torch.randn(like.shape, generator=generator, device=dev, dtype=torch.float32)
        return cls(t.to(like.device), noise.to(like.device, like.dtype))


class LatentGANLoss(nn.Module):
    """Latent GAN objectives around a discriminator ``D(latents, t, prompt) → logits``.

    Args:
        alphas_cumprod: ``(T,)`` ᾱ of the schedule used for :func:`diffuse_latents`.
        kind: ``non_saturating`` (default, docs/method.md §6.2d), ``hinge`` or ``lsgan``.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, kind: GANKind = "non_saturating"):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone(),
                             persistent=False)
        self.gan = GANLoss(kind)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def generator_loss(self, disc: nn.Module, fake: torch.Tensor, prompt: torch.Tensor, inputs: LatentGANInputs
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``L_G`` on the generator's latent ``fake`` (with graph). Freeze ``disc`` before calling.

        Returns ``(loss, fake_logits)``.
        """
        logits = disc(diffuse_latents(fake, inputs.t, inputs.noise, self.alphas_cumprod), inputs.t, prompt.detach())
        return self.gan.generator(logits.float()), logits

    def discriminator_loss(self, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, prompt: torch.Tensor,
                           inputs: LatentGANInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``L_D`` on the real latent and the detached fake, same ``t`` and ``ε``.

        Returns ``(loss, real_logits, fake_logits)``.
        """
        prompt = prompt.detach()
        real_logits = disc(diffuse_latents(real.detach(), inputs.t, inputs.noise, self.alphas_cumprod), inputs.t,
                           prompt)
        fake_logits = disc(diffuse_latents(fake.detach(), inputs.t, inputs.noise, self.alphas_cumprod), inputs.t,
                           prompt)
        return self.gan.discriminator(real_logits.float(), fake_logits.float()), real_logits, fake_logits


__all__ = ["diffuse_latents", "LatentGANInputs", "LatentGANLoss"]
