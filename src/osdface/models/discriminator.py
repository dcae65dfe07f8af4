"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator``, as used by taming-transformers/DAEFR).

Ported from taming-transformers ``taming/modules/discriminator/model.py`` (MIT licence), which
follows pix2pix/CycleGAN (BSD licence). Image ``(B, C, H, W)`` → logit map ``(B, 1, h, w)``: one
real/fake logit per overlapping patch (70×70 receptive field with 3 layers).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

NormKind = Literal["batch", "group", "none"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose from batch, group, none")


class NLayerDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN: 4×4 convs, LeakyReLU(0.2), normalisation after every conv but the first and last.

    Args:
        in_channels: image channels.
        ndf: width of the first layer (doubles per layer, capped at ``8·ndf``).
        n_layers: number of stride-2 layers after the first conv.
        norm: ``"batch"`` (taming/DAEFR), ``"group"`` or ``"none"``; with ``"batch"`` the convs
            carry no bias, as in the original.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: NormKind = "batch"):
        super().__init__()
        _norm(norm, 32)  # validate early
        use_bias = norm != "batch"
        kw, pad = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kw, 2, pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, pad, bias=use_bias), _norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, pad, bias=use_bias), _norm(norm, ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, kw, 1, pad)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` (model space) → logits ``(B, 1, h, w)``."""
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """taming's ``weights_init``: conv N(0, 0.02); norm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
