"""Feature-association loss of stage 1 (DAEFR ``association_stage.py``; OSDFace docs/method.md §5.2).

HQ and LQ pre-quantisation features of the same faces are flattened over **all positions of all
images in the batch** into ``N = B·H·W`` rows, L2-normalised, and compared with a CLIP-style
similarity ``S = exp(s)·Ĥ·L̂ᵀ`` (N × N); row i's positive is column i. The loss is the symmetric
cross-entropy ``½[CE(S, diag) + CE(Sᵀ, diag)]``. ``s`` is a learnable scalar initialised to
``log(1/0.07)`` (scale 14.29) as in CLIP/DAEFR.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


class AssociationLoss(nn.Module):
    """Symmetric CLIP cross-entropy between HQ and LQ feature grids.

    Args:
        logit_scale_init: initial ``s`` (``log(1/0.07)``).
        learnable: make ``s`` a trainable parameter (DAEFR) or a fixed buffer.
        max_logit_scale: optional clamp of ``s`` (CLIP clamps the scale at 100 = ``log 100``);
            ``None`` (DAEFR) leaves it free.

    Call as ``loss(h_hq, h_lq)`` with ``(B, C, H, W)`` features of the same faces.
    """

    def __init__(self, logit_scale_init: float = CLIP_LOGIT_SCALE_INIT, learnable: bool = True,
                 max_logit_scale: float | None = None):
        super().__init__()
        s = torch.tensor(float(logit_scale_init))
        if learnable:
            self.logit_scale = nn.Parameter(s)
        else:
            self.register_buffer("logit_scale", s)
        self.max_logit_scale = max_logit_scale

    def similarity(self, h_hq: torch.Tensor, h_lq: torch.Tensor) -> torch.Tensor:
        """The ``(N, N)`` scaled cosine-similarity matrix, ``N = B·H·W``, rows HQ, columns LQ."""
        if h_hq.shape != h_lq.shape:
            raise ValueError(f"HQ and LQ features must have the same shape, got {tuple(h_hq.shape)} and {tuple(h_lq.shape)}")
        c = h_hq.shape[1]
        hq = F.normalize(h_hq.float().permute(0, 2, 3, 1).reshape(-1, c), dim=1)  # (N, C)
        lq = F.normalize(h_lq.float().permute(0, 2, 3, 1).reshape(-1, c), dim=1)  # (N, C)
        s = self.logit_scale if self.max_logit_scale is None else self.logit_scale.clamp(max=self.max_logit_scale)
        return s.exp() * hq @ lq.t()  # (N, N)

    def forward(self, h_hq: torch.Tensor, h_lq: torch.Tensor) -> torch.Tensor:
        logits = self.similarity(h_hq, h_lq)
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
