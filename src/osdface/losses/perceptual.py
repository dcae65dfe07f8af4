"""Differentiable perceptual losses: LPIPS, DISTS and the paper's edge-aware DISTS (docs/method.md §6.2b).

All take ``pred`` and ``target`` as ``(B, 3, H, W)`` float RGB in [0, 1] (map [-1, 1] decoder
output with :func:`osdface.image.from_model_range` first) and return a scalar (batch mean) that
is differentiable w.r.t. ``pred`` (and ``target``). The networks are the evaluation metrics'
networks (:mod:`osdface.io.networks`: the ``lpips`` and ``DISTS_pytorch`` code with
local weights), frozen and kept in eval mode even when the owning model calls ``.train()``.

``pretrained=True`` reads the weight files from ``weights_dir`` (default
``$OSDFACE_HOME/metrics``; install them with ``osdface weights install``) and raises
:class:`~osdface.weights.WeightsNotFoundError` naming the missing file. ``pretrained=False``
builds the same networks with random weights and reads nothing (tests, tiny runs).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LPIPSLoss", "DISTSLoss", "EdgeAwareDISTSLoss", "sobel_edges"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"{name}: pred must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")


class _FrozenNetLoss(nn.Module):
    """Base: holds a frozen metric network that always stays in eval mode."""

    net: nn.Module

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # dropout / BN of the metric network must never switch to training
        return self


class LPIPSLoss(_FrozenNetLoss):
    """LPIPS v0.1 (``lpips`` package numerics) as a loss.

    Args:
        net: ``"alex"`` (lpips' default) or ``"vgg"`` (the usual training choice).
        weights_dir: metrics weights folder; ``None`` = ``$OSDFACE_HOME/metrics``.
        pretrained: ``False`` = random weights, no files read.

    ``forward(pred, target)``: ``(B, 3, H, W)`` in [0, 1] each → 0-d tensor, mean LPIPS over the batch.
    """

    def __init__(self, net: str = "vgg", weights_dir: str | os.PathLike | None = None, pretrained: bool = True):
        super().__init__()
        from ..io.networks import build_lpips

        self.net = build_lpips(net, weights_dir=weights_dir, pretrained=pretrained)
        self.net_name = net

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, "LPIPSLoss")
        return self.net(pred, target, normalize=True).mean()


class DISTSLoss(_FrozenNetLoss):
    """DISTS (``DISTS_pytorch`` numerics, = pyiqa ``dists`` with ``as_loss=True``) as a loss.

    ``forward(pred, target)``: ``(B, C, H, W)`` in [0, 1] (C = 3; C = 1 is accepted for edge maps,
    as in pyiqa) → 0-d tensor, mean DISTS over the batch.
    """

    def __init__(self, weights_dir: str | os.PathLike | None = None, pretrained: bool = True):
        super().__init__()
        from ..io.networks import build_dists

        self.net = build_dists(weights_dir=weights_dir, pretrained=pretrained)

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image DISTS, ``(B,)``; differentiable."""
        if pred.ndim != 4 or pred.shape[1] not in (1, 3) or pred.shape != target.shape:
            raise ValueError(
                f"DISTSLoss: pred and target must be equal-shaped (B, 1|3, H, W), got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        # DISTS_pytorch.DISTS.forward(ref, dist): symmetric in its two inputs.
        return self.net(target, pred, require_grad=True, batch_average=False).reshape(-1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.distance(pred, target).mean()


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Edge magnitude of docs/method.md §6.2b: ``(B, 3, H, W)`` in [0, 1] → ``(B, 1, H, W)``, range ≈ [0.001, 5.66].

    Grayscale = channel mean; 3×3 Sobel ``Gx = [[-1,0,1],[-2,0,2],[-1,0,1]]``, ``Gy = Gx^T`` as
    cross-correlation with zero padding 1; ``sqrt(gx² + gy² + 1e-6)``; no rescaling.
    """
    gray = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    gy = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device)
    ex = F.conv2d(gray, gx.view(1, 1, 3, 3), padding=1)
    ey = F.conv2d(gray, gy.view(1, 1, 3, 3), padding=1)
    return torch.sqrt(ex**2 + ey**2 + 1e-6)


class EdgeAwareDISTSLoss(DISTSLoss):
    """EA-DISTS (docs/method.md §6.2b, the official ``edge_aware_dists_demo.py``):
    ``DISTS(pred, target) + DISTS(S(pred), S(target))`` with equal weights, S = :func:`sobel_edges`.

    The 1-channel edge maps go through the same DISTS network (ImageNet normalisation broadcasts
    to 3 channels; the level-0 term sums the three per-channel α/β over the single channel).

    ``forward(pred, target)``: ``(B, 3, H, W)`` in [0, 1] → 0-d tensor (batch mean).
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, "EdgeAwareDISTSLoss")
        return self.distance(pred, target).mean() + self.distance(sobel_edges(pred), sobel_edges(target)).mean()
