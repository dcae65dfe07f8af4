"""Vector-quantisation loss (taming-transformers / DAEFR form) and codebook-usage statistics."""

from __future__ import annotations

import math

import torch
from torch import nn


class VQLoss(nn.Module):
    """``mean((sg[codes] − z)²) + β·mean((codes − sg[z])²)`` (docs/method.md §5.2).

    In this (taming/DAEFR) form β multiplies the *codebook* term, which moves the dictionary
    towards the encoder output; the un-weighted term is the commitment term, which pulls the
    encoder towards its codes. The straight-through estimator is applied by the quantiser.

    Call as ``loss(codes, z)``: ``codes`` = selected dictionary vectors (gradient reaches the
    dictionary), ``z`` = encoder features (gradient reaches the encoder), both ``(B, C, H, W)``.
    """

    def __init__(self, beta: float = 0.25):
        super().__init__()
        self.beta = float(beta)

    def forward(self, codes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        commitment = ((codes.detach() - z) ** 2).mean()
        codebook = ((codes - z.detach()) ** 2).mean()
        return commitment + self.beta * codebook


@torch.no_grad()
def codebook_usage(indices: torch.Tensor, n_embed: int) -> dict[str, float]:
    """Perplexity and fraction of the dictionary used by a batch of code indices.

    Args:
        indices: int64 code indices of any shape.
        n_embed: dictionary size.

    Returns:
        ``{"perplexity": exp(H(p)), "usage": #distinct / n_embed}``; perplexity is in
        ``[1, n_embed]`` (equals the number of codes when they are used uniformly).
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=n_embed).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"perplexity": math.exp(entropy), "usage": float((counts > 0).sum().item()) / n_embed}
