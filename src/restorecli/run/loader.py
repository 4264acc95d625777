"""A pipeline loader that can travel to another process: a worker of `run.workers`, a Ray actor.

`run.loop.run_batch` takes any `load_pipeline()` callable; a lambda does in one process. A worker
process needs one it can unpickle, and one that loads onto *its* device: `PipelineLoader` is the
factory (by default `pipeline.build.load_pipeline`, the seam tests replace) with its arguments, and
`on(device)` gives the same loader for another device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..settings import LoadSettings


@dataclass(frozen=True)
class PipelineLoader:
    """`factory(load, stage1_only=stage1_only)`; `factory` must be picklable (a module-level function or
    an instance of a module-level class)."""

    load: LoadSettings
    stage1_only: bool = False
    factory: Callable | None = None  # None: restorecli.pipeline.build.load_pipeline, looked up when called

    def on(self, device: str) -> PipelineLoader:
        return dataclasses.replace(self, load=self.load.replace(device=device))

    def __call__(self):
        factory = self.factory
        if factory is None:
            from ..pipeline.build import load_pipeline as factory
        return factory(self.load, stage1_only=self.stage1_only)
