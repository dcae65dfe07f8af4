"""One-step restoration of aligned face crops."""

from .execution import ExecutionPlan, ResolvedPlan
from .output import OSDFacePipelineOutput
from .pipeline_osdface import OSDFacePipeline

__all__ = ["ExecutionPlan", "OSDFacePipeline", "OSDFacePipelineOutput", "ResolvedPlan"]
