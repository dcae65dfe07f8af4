"""Pixel losses: ``(pred, target) -> scalar``, images of any range and shape (same for both)."""

from __future__ import annotations

import torch
from torch import nn


class L1Loss(nn.Module):
    """Mean absolute error."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).abs().mean()


class MSELoss(nn.Module):
    """Mean squared error."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((pred - target) ** 2).mean()


class CharbonnierLoss(nn.Module):
    """``mean(sqrt((pred − target)² + eps²))`` (a smooth L1)."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((pred - target) ** 2 + self.eps**2).mean()
