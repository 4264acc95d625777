"""Which models are on the device when: idle models wait in host memory on small GPUs.

Simple explicit moves around each stage, no hooks (accelerate's offloading is not a dependency):

* always, on an accelerator: the stage-1 cleaner leaves the device once stage 1 is done (it comes
  back for the next image), the text encoder once the prompts are encoded (embeddings are cached per
  prompt, so it is needed again only for a new prompt);
* with ``offload=True`` (``--offload``) also the VAE outside encoding / decoding (and guidance) and
  the UNet and IRControlNet outside sampling, so a stage holds only its own weights.

On the CPU every move is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger("restorecli.pipeline.placement")

CPU = torch.device("cpu")


def module_device(module) -> torch.device | None:
    """The device of a module's first parameter (a spandrel descriptor's model too); None without any."""
    model = getattr(module, "model", module)
    for p in model.parameters():
        return p.device
    return None


def _move(module, device: torch.device) -> None:
    if module is None or module_device(module) in (None, device):
        return
    target = getattr(module, "descriptor", module)  # restorecli Cleaner -> its spandrel descriptor
    target.to(device)


class Placement:
    """Moves models between the execution `device` and host memory around the pipeline's stages."""

    def __init__(self, device: torch.device | str, *, offload: bool = False):
        self.device = torch.device(device)
        self.offload = bool(offload)

    @property
    def active(self) -> bool:
        """Whether moves happen at all (not on the CPU)."""
        return self.device.type != "cpu"

    def to_device(self, *modules) -> None:
        if self.active:
            for m in modules:
                _move(m, self.device)

    def to_host(self, *modules) -> None:
        if self.active:
            for m in modules:
                _move(m, CPU)

    @contextlib.contextmanager
    def using(self, *modules, release: bool | None = None) -> Iterator[None]:
        """On the device for the block; back to host memory afterwards if `release` (default: offload)."""
        self.to_device(*modules)
        try:
            yield
        finally:
            if self.offload if release is None else release:
                self.to_host(*modules)
