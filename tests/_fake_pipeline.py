"""A stand-in DiffBIR pipeline for the batch tests, and a `restore` entry point that uses it.

The batch machinery (discovery, planning, the overlapped loop, atomic writes, resume, signals) does
not depend on what the model computes, and the tiny reference model costs seconds per image on a
shared CPU, so most batch tests run this: a deterministic `upscale`-times nearest enlargement of the
inverted image. Knobs (environment, so that the subprocess tests can set them):

  FAKE_DELAY=0.3          seconds each image spends "on the device"
  FAKE_OOM=big            inputs whose path contains this raise CUDA's out-of-memory RuntimeError
  FAKE_PRINT=1            print to stdout inside the model (a misbehaving dependency)

`python tests/_fake_pipeline.py ARGS...` runs `restore ARGS...` with this pipeline.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import numpy as np


class FakePipeline:
    def __init__(self, delay: float | None = None, oom: str | None = None, on_call=None):
        self.delay = float(os.environ.get("FAKE_DELAY", "0")) if delay is None else delay
        self.oom = os.environ.get("FAKE_OOM") if oom is None else oom
        self.on_call = on_call
        self.calls: list[str] = []

    def __call__(self, rgb, *, output_type="pt", on_step=None, source=None, upscale=1.0, seed=0, **kwargs):
        import torch

        self.calls.append(source)
        if self.on_call is not None:
            self.on_call(source)
        if os.environ.get("FAKE_PRINT"):
            print("a stray line from a dependency")
        if self.oom and source and self.oom in source:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.delay:
            time.sleep(self.delay)
        if on_step is not None:
            on_step(1, 1)
        scale = max(1, int(upscale))
        top = 65535.0 if rgb.dtype == np.uint16 else 255.0
        x = 1.0 - rgb.astype(np.float32) / top
        x = x.repeat(scale, axis=0).repeat(scale, axis=1)
        image = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
        # the "guidance map": the first channel of the output, shaped (1, 1, H, W) as the pipeline's
        maps = image[None, :1] if kwargs.get("return_guidance_map") else None
        return SimpleNamespace(images=[image], seeds=[seed], guidance_maps=maps)


def install(monkeypatch_or_none=None, **kwargs) -> list[FakePipeline]:
    """Make `restorecli.pipeline.loading.load_pipeline` build FakePipelines; returns the list of those built."""
    import restorecli.pipeline.loading

    built: list[FakePipeline] = []

    def load_pipeline(opts, **_):
        pipe = FakePipeline(**kwargs)
        built.append(pipe)
        return pipe

    if monkeypatch_or_none is None:
        restorecli.pipeline.loading.load_pipeline = load_pipeline
    else:
        monkeypatch_or_none.setattr(restorecli.pipeline.loading, "load_pipeline", load_pipeline)
    return built


if __name__ == "__main__":
    import signal

    # A shell without job control starts background commands with SIGINT ignored; the tests send it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install()
    from restorecli.cli.app import main

    sys.exit(main(sys.argv[1:]))
