"""What every captioner offers, and the shared machinery of the transformers-based ones.

A captioner turns one image into one short caption. The model sits in host memory and comes to the
accelerator only while it captions (``caption``, or a ``held()`` block for several captions), so stage 2
never shares the device with it. Captions of identical images (same pixels) are computed once per
captioner: a batch with duplicates, or tiles that cover the same region, reuse them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from .images import as_rgb_image

__all__ = ["Captioner", "ModelCaptioner", "backend_kwargs", "pil_image_processor", "quiet_transformers"]

log = logging.getLogger("restorecli.captions")

#: How many captions a captioner remembers (by image content).
CACHE_SIZE = 4096


@runtime_checkable
class Captioner(Protocol):
    """`caption(image) -> str`: one short description of a PIL image or HWC array."""

    #: what `--captioner` named (florence2, llava, a Hub id or a folder)
    name: str
    #: the commit of the weights where known (pinned, or a Hub snapshot), else None
    revision: str | None

    def caption(self, image) -> str: ...

    def held(self) -> contextlib.AbstractContextManager: ...


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and advisory warnings off for the block (the library prints nothing)."""
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    level = tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def backend_kwargs() -> dict:
    """Ask transformers for the PIL image processors (what upstream used; transformers 5 defaults to torchvision)."""
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


def pil_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, **backend_kwargs())


def _image_key(image: Image.Image) -> str:
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


class ModelCaptioner:
    """A transformers model that captions images, on `device` only while it works.

    Subclasses implement `_caption(image: PIL RGB) -> str` with the model on the device.
    """

    def __init__(self, model, *, name: str, revision: str | None, device: torch.device | str):
        self.model = model
        self.name = name
        self.revision = revision
        self.device = torch.device(device)
        self._held = 0
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._movable = True

    # -- placement --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (transformers' first floating-point parameter; quantized weights are not)."""
        return self.model.dtype

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _move(self, device: torch.device) -> None:
        if not self._movable or self.model_device().type == device.type:
            return
        try:
            self.model.to(device)
        except (ValueError, RuntimeError, NotImplementedError) as exc:  # e.g. 8-bit on an old bitsandbytes
            self._movable = False
            log.warning("%s: the captioner cannot leave the device (%s); it stays there during restoration",
                        self.name, " ".join(str(exc).split())[:160])

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The model on the device for the whole block (several captions), back in host memory after."""
        if self._held == 0:
            self._move(self.device)
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if self._held == 0 and self.device.type != "cpu":
                self._move(torch.device("cpu"))

    def release(self) -> None:
        """Leave the accelerator now (a no-op on the CPU and inside `held()`)."""
        if self._held == 0 and self.device.type != "cpu":
            self._move(torch.device("cpu"))

    # -- captioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def caption(self, image) -> str:
        """One caption of `image` (PIL, or HWC uint8/uint16/float array), stripped of surrounding space."""
        rgb = as_rgb_image(image)
        key = _image_key(rgb)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with self.held(), quiet_transformers():
            text = self._caption(rgb).strip()
        self._cache[key] = text
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return text

    def captions(self, images: Sequence) -> list[str]:
        """`caption` of each image, with the model on the device once for all of them."""
        with self.held():
            return [self.caption(image) for image in images]

    def _caption(self, image: Image.Image) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _generate(self, inputs: dict, **options) -> torch.Tensor:
        """The answer's token ids for one image's model inputs: every tensor moved where the model
        computes (floating-point ones in its dtype), `generate` without sampling and with at most
        `max_new_tokens` (plus `options`: beams, pad id, ...), and of a decoder-only model's output only
        what follows the prompt (an encoder-decoder returns just the answer)."""
        feed = {k: self._on_device(v, floating=v.is_floating_point()) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out = self.model.generate(**feed, do_sample=False, max_new_tokens=self.max_new_tokens, **options)
        if self.model.config.is_encoder_decoder:
            return out[0]
        return out[0, feed["input_ids"].shape[1]:]

    def _on_device(self, tensor: torch.Tensor, *, floating: bool = False) -> torch.Tensor:
        """An input tensor where the model computes (pixel values also in the model's dtype)."""
        device = self.model_device()
        return tensor.to(device=device, dtype=self.dtype) if floating else tensor.to(device)
