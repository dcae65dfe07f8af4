"""Weighted sums of ``(pred, target) -> scalar`` losses, with the named terms kept for logging.

The explicit name → factory dictionary :data:`RECONSTRUCTION_LOSSES` is the one place a loss
name in a config is resolved, for both training stages; unknown names raise with the valid
choices. A loss built from it takes ``(B, 3, H, W)`` images in the range
:func:`loss_input_range` names:

* ``"model"`` (model space, [-1, 1], as the decoders produce): the pixel losses compare them
  directly (DAEFR's L1 is on [-1, 1]; stage 2's MSE on decoded images in [-1, 1]), LPIPS maps
  them to [0, 1] first;
* ``"unit"`` ([0, 1]): stage 2's EA-DISTS and identity losses, which take the images as the
  pipeline returns them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .pixel import CharbonnierLoss, L1Loss, MSELoss


class FromModelRange(nn.Module):
    """Feed a [0, 1]-input loss with model-space ([-1, 1]) images."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss((pred + 1) / 2, (target + 1) / 2)


def _lpips(net: str = "vgg", pretrained: bool = True) -> nn.Module:
    """LPIPS on model-space images. With ``pretrained=False`` (tiny runs, tests) the random linear
    heads are made non-negative, as trained LPIPS heads are, so the loss stays a distance (≥ 0)
    instead of an objective that is unbounded below."""
    from .perceptual import LPIPSLoss  # heavy backend, imported lazily

    loss = LPIPSLoss(net=net, pretrained=pretrained)
    if not pretrained:
        with torch.no_grad():
            for m in loss.net.lins.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.abs_()
    return FromModelRange(loss)


def _ea_dists(weights_dir: str | None = None, pretrained: bool = True) -> nn.Module:
    """EA-DISTS (docs/method.md §6.2b) on [0, 1] images; ``pretrained=False``: random DISTS network."""
    from .perceptual import EdgeAwareDISTSLoss  # heavy backend, imported lazily

    return EdgeAwareDISTSLoss(weights_dir=weights_dir, pretrained=pretrained)


def _identity(network: str = "arcface", weights: str | None = None, weights_dir: str | None = None,
              pretrained: bool = True) -> nn.Module:
    """``1 − cos`` identity loss (docs/method.md §6.2c) on [0, 1] images with the named identity network."""
    from .identity import IdentityLoss, build_identity_network  # heavy backend, imported lazily

    return IdentityLoss(build_identity_network(network, weights=weights, weights_dir=weights_dir,
                                               pretrained=pretrained))


#: loss name → factory (keyword options from the config go to the factory).
RECONSTRUCTION_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "l1": L1Loss,
    "l2": MSELoss,
    "mse": MSELoss,
    "charbonnier": CharbonnierLoss,
    "lpips": _lpips,
    "ea_dists": _ea_dists,
    "identity": _identity,
}

#: registered losses that take images in [0, 1]; every other one takes model space [-1, 1].
UNIT_RANGE_LOSSES = frozenset({"ea_dists", "identity"})


def _check_name(name: str) -> None:
    if name not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(sorted(RECONSTRUCTION_LOSSES))}")


def build_loss(name: str, **options) -> nn.Module:
    """Instantiate a registered loss by name."""
    _check_name(name)
    return RECONSTRUCTION_LOSSES[name](**options)


def loss_input_range(name: str) -> Literal["model", "unit"]:
    """The image range the registered loss ``name`` takes: ``"model"`` ([-1, 1]) or ``"unit"`` ([0, 1])."""
    _check_name(name)
    return "unit" if name in UNIT_RANGE_LOSSES else "model"


@dataclass
class LossOutput:
    """``total`` (scalar with graph) and the un-weighted ``terms`` (scalars with graph)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached(self, prefix: str = "") -> dict[str, float]:
        """Plain floats for logging: every term and the total."""
        out = {f"{prefix}{k}": float(v.detach()) for k, v in self.terms.items()}
        out[f"{prefix}total"] = float(self.total.detach())
        return out


class LossBundle(nn.Module):
    """``total = Σ weight_i · loss_i(pred, target)``; terms with weight 0 are not computed.

    Args:
        losses: name → loss module.
        weights: name → weight (every name in ``losses`` must have one).
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        missing = sorted(set(losses) - set(weights))
        if missing:
            raise ValueError(f"no weight for loss(es) {missing}")
        self.weights = {k: float(weights[k]) for k in losses}
        self.losses = nn.ModuleDict({k: m for k, m in losses.items() if self.weights[k] != 0.0})

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> LossOutput:
        terms = {name: loss(pred, target) for name, loss in self.losses.items()}
        if not terms:
            return LossOutput(total=pred.new_zeros(()), terms={})
        total = sum(self.weights[k] * v for k, v in terms.items())
        return LossOutput(total=total, terms=terms)

    @staticmethod
    def combine(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> LossOutput:
        """Weighted sum of already computed terms (every term needs a weight)."""
        missing = sorted(set(terms) - set(weights))
        if missing:
            raise ValueError(f"no weight for term(s) {missing}")
        total = sum(float(weights[k]) * v for k, v in terms.items())
        return LossOutput(total=total, terms=dict(terms))
