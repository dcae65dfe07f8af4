"""Output container of :class:`~osdface.pipelines.OSDFacePipeline`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class OSDFacePipelineOutput:
    """Restored faces.

    Attributes:
        images: ``output_type="pt"``: ``(B, 3, H, W)`` float32 tensor in [0, 1];
            ``"np"``: ``(B, H, W, 3)`` float32 array in [0, 1] (as diffusers); ``"uint8"``:
            ``(B, H, W, 3)`` uint8 array; ``"pil"``: list of RGB PIL images.
        prompt_indices: ``(B, T)`` dictionary indices of the visual prompt (-1 = zero token).
    """

    images: Any
    prompt_indices: Any = None
