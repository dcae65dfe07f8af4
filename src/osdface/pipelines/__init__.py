"""One-step restoration of aligned face crops."""

from .output import OSDFacePipelineOutput
from .pipeline_osdface import OSDFacePipeline

__all__ = ["OSDFacePipeline", "OSDFacePipelineOutput"]
