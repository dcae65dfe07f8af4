"""GAN objectives and the taming/DAEFR adaptive generator weight.

Discriminator losses take ``(real_logits, fake_logits)``, generator losses ``fake_logits``;
logits are any shape (a PatchGAN map is averaged). The adaptive weight balances the GAN gradient
against the reconstruction gradient at the decoder's last layer (Esser et al., taming-transformers,
``VQLPIPSWithDiscriminator.calculate_adaptive_weight``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GANKind = Literal["hinge", "non_saturating", "lsgan"]


class GANLoss(nn.Module):
    """Generator and discriminator objectives of one GAN formulation.

    * ``hinge``: D ``0.5·(mean(relu(1 − real)) + mean(relu(1 + fake)))``, G ``−mean(fake)``.
    * ``non_saturating``: D ``0.5·(mean(softplus(−real)) + mean(softplus(fake)))``, G ``mean(softplus(−fake))``.
    * ``lsgan``: D ``0.5·(mean((real − 1)²) + mean(fake²))``, G ``mean((fake − 1)²)``.
    """

    KINDS = ("hinge", "non_saturating", "lsgan")

    def __init__(self, kind: GANKind = "hinge"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown GAN loss {kind!r}; choose from {', '.join(self.KINDS)}")
        self.kind = kind

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """D loss (scalar); ``fake_logits`` must come from detached fakes."""
        if self.kind == "hinge":
            return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
        if self.kind == "non_saturating":
            return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
        return 0.5 * (((real_logits - 1.0) ** 2).mean() + (fake_logits**2).mean())

    def generator(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """G loss (scalar)."""
        if self.kind == "hinge":
            return -fake_logits.mean()
        if self.kind == "non_saturating":
            return F.softplus(-fake_logits).mean()
        return ((fake_logits - 1.0) ** 2).mean()

    def forward(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.generator(fake_logits)


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """``clamp(‖∇_w rec_loss‖ / (‖∇_w g_loss‖ + eps), 0, max_weight)`` at ``w = last_layer``, detached.

    Both losses must still have their graphs (they are retained for the later backward).
    Multiply by the configured GAN weight (0.8 in DAEFR) to get λ_adapt.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(rec_grad.float()) / (torch.norm(g_grad.float()) + eps)
    return torch.clamp(w, 0.0, max_weight).detach()
