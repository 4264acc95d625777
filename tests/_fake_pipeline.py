"""A stand-in DiffBIR pipeline for the batch tests, and a `restore` entry point that uses it.

The batch machinery (discovery, planning, the overlapped loop, atomic writes, resume, signals) does
not depend on what the model computes, and the tiny reference model costs seconds per image on a
shared CPU, so most batch tests run this: a deterministic `upscale`-times nearest enlargement of the
inverted image. Knobs (environment, so that the subprocess tests can set them):

  FAKE_DELAY=0.3          seconds each image spends "on the device"
  FAKE_OOM=big            inputs whose path contains this raise CUDA's out-of-memory RuntimeError
  FAKE_PRINT=1            print to stdout inside the model (a misbehaving dependency)
  FAKE_CAPTIONER=1        a stand-in captioner (tests/_tiny_captioners.py StubCaptioner: no model, no weights)
  FAKE_CRASH=name         inputs whose path contains this kill the process restoring them (SIGKILL)
  FAKE_PIDS=DIR           each process writes DIR/<pid> when it restores an image (tests find workers)

`python tests/_fake_pipeline.py ARGS...` runs `restore ARGS...` with this pipeline.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import numpy as np


class FakePipeline:
    def __init__(self, delay: float | None = None, oom: str | None = None, on_call=None, captioner=None):
        self.delay = float(os.environ.get("FAKE_DELAY", "0")) if delay is None else delay
        self.oom = os.environ.get("FAKE_OOM") if oom is None else oom
        self.on_call = on_call
        self.calls: list[str] = []
        self.settings: list = []  # the RestoreSettings of each call
        if captioner is None and os.environ.get("FAKE_CAPTIONER"):
            from _tiny_captioners import StubCaptioner

            captioner = StubCaptioner("fake")
        self.captioner = captioner
        self.given_captions: list = []  # the `caption` argument of each call

    def __call__(self, rgb, settings=None, **kwargs):
        """Bound against the real `DiffBIRPipeline.__call__` signature, so a call the real pipeline would
        refuse (an unknown keyword, a wrong settings type, a bad override) fails here too."""
        import inspect

        from restorecli.pipeline.diffbir import DiffBIRPipeline
        from restorecli.settings import RestoreSettings

        bound = inspect.signature(DiffBIRPipeline.__call__).bind(self, rgb, settings, **kwargs)
        args = bound.arguments
        base = args.get("settings") or RestoreSettings()
        assert isinstance(base, RestoreSettings), f"settings must be RestoreSettings, got {type(base).__name__}"
        settings = base.replace(**args.get("overrides", {}))
        self.settings.append(settings)
        output_type, on_step, source = args.get("output_type", "np"), args.get("on_step"), args.get("source")
        from restorecli.captions import assemble_prompt

        caption = args.get("caption")
        self.given_captions.append(caption)
        if caption is None and self.captioner is not None and not settings.stage1_only:
            caption = self.captioner.caption(rgb)
        prompt = None if settings.stage1_only else assemble_prompt(caption, settings.prompts.prompt)
        upscale, seed = settings.upscale, settings.sampler.seed
        import torch

        self.calls.append(source)
        if self.on_call is not None:
            self.on_call(source)
        if os.environ.get("FAKE_PRINT"):
            print("a stray line from a dependency")
        crash = os.environ.get("FAKE_CRASH")
        if crash and source and crash in source:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("FAKE_PIDS"):
            with open(os.path.join(os.environ["FAKE_PIDS"], str(os.getpid())), "a") as f:
                f.write(f"{source}\n")
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
        maps = image[None, :1] if args.get("return_guidance_map") else None
        return SimpleNamespace(images=[image], seeds=[seed], guidance_maps=maps, captions=[caption], prompts=[prompt])


class FakeLoader:
    """A stand-in for `restorecli.pipeline.build.load_pipeline` that builds FakePipelines. It pickles (by
    reference to this module), so worker processes (`--devices`) and Ray actors (`--ray`) get it too;
    there `built` is their own copy."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.built: list[FakePipeline] = []

    def __call__(self, load, *, stage1_only=False, **_):
        from restorecli.settings import LoadSettings

        assert isinstance(load, LoadSettings), f"load_pipeline takes LoadSettings, got {type(load).__name__}"
        pipe = FakePipeline(**self.kwargs)
        pipe.load, pipe.stage1_only = load, stage1_only
        self.built.append(pipe)
        return pipe


def install(monkeypatch_or_none=None, **kwargs) -> list[FakePipeline]:
    """Make `restorecli.pipeline.build.load_pipeline` build FakePipelines; returns the list of those built."""
    import restorecli.pipeline.build

    loader = FakeLoader(**kwargs)
    if monkeypatch_or_none is None:
        restorecli.pipeline.build.load_pipeline = loader
    else:
        monkeypatch_or_none.setattr(restorecli.pipeline.build, "load_pipeline", loader)
    return loader.built


if __name__ == "__main__":
    import signal

    # A shell without job control starts background commands with SIGINT ignored; the tests send it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install()
    from restorecli.cli.app import main

    sys.exit(main(sys.argv[1:]))
