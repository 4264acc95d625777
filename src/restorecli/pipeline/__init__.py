"""The two-stage restoration pipeline: `DiffBIRPipeline`, its loading, memory planning and placement."""

from .diffbir import DiffBIROutput, DiffBIRPipeline

__all__ = ["DiffBIROutput", "DiffBIRPipeline"]
