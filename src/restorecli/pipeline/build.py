"""The one function the CLI calls to get a pipeline (a seam the tests replace with a stand-in)."""

from __future__ import annotations

from typing import Callable

import torch

from ..settings import LoadSettings
from .diffbir import DiffBIRPipeline


def load_pipeline(load: LoadSettings, *, stage1_only: bool = False, torch_dtype: torch.dtype | None = None,
                  progress: Callable | None = None) -> DiffBIRPipeline:
    """`DiffBIRPipeline.from_settings`: the pipeline `load` describes, with its version's defaults
    (`task` unaligned_face: a `restorecli.faces.FacePipeline`)."""
    if load.task == "unaligned_face":
        from ..faces.pipeline import FacePipeline

        return FacePipeline.from_settings(load, stage1_only=stage1_only, torch_dtype=torch_dtype, progress=progress)
    return DiffBIRPipeline.from_settings(load, stage1_only=stage1_only, torch_dtype=torch_dtype, progress=progress)
