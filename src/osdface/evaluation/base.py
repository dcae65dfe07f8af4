"""The metric interface, shared by :mod:`.metrics` (the registry) and the ported metrics.

Kept apart from the registry so that the ported metric modules (:mod:`.musiq`, :mod:`.maniqa`,
:mod:`.clipiqa`, :mod:`.landmarks`) can subclass :class:`Metric` without importing the registry
that imports them.
"""

from __future__ import annotations

import torch

from ..errors import InvalidSettingError


class Metric:
    """Base class. Subclasses set the class attributes and implement :meth:`compute`.

    Attributes:
        name: registry name.
        full_reference: needs ``gt``.
        lower_better: ``True`` when smaller is better (LPIPS, DISTS, NIQE, FID, Deg, LMD).
        set_level: computed over whole sets (FID), not per image.
        device: torch device the networks run on.
    """

    name: str = ""
    full_reference: bool = True
    lower_better: bool = False
    set_level: bool = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of a batch: ``pred`` (and ``gt``) ``(B, 3, H, W)`` RGB in [0, 1] → ``(B,)`` float64."""
        from ..image import ImageError, to_tensor

        pred = to_tensor(pred, name=f"{self.name}: pred")
        if self.full_reference:
            if gt is None:
                raise InvalidSettingError(f"{self.name} is a full-reference metric: give gt")
            gt = to_tensor(gt, name=f"{self.name}: gt")
            if gt.shape != pred.shape:
                raise ImageError(f"{self.name}: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
        with torch.no_grad():
            out = self.compute(pred, gt)
        return torch.as_tensor(out, dtype=torch.float64).reshape(-1).cpu()

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        kind = "FR" if self.full_reference else "NR"
        return f"<{type(self).__name__} {self.name} {kind} {'lower' if self.lower_better else 'higher'}-better>"


__all__ = ["Metric"]
