"""Losses: each a small module ``(pred, target) -> scalar``."""

from .perceptual import DISTSLoss, EdgeAwareDISTSLoss, LPIPSLoss, sobel_edges

__all__ = ["LPIPSLoss", "DISTSLoss", "EdgeAwareDISTSLoss", "sobel_edges"]
