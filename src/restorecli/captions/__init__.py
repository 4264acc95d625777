"""Semantic priors: a vision-language model describes the input, and the caption leads the prompt.

DiffBIR v2.1 was trained on LLaVA captions and the official tool's default run prepends LLaVA's short
description of the input to the positive prompt (DiffBIR ``diffbir/utils/caption.py``,
``diffbir/inference/loop.py``). This package offers that captioner (`llava`), a light default
(`florence2`), any image-text-to-text model of transformers, captions read from files, and captions
per sampling tile.

    from restorecli.captions import load_captioner, assemble_prompt
    captioner = load_captioner("florence2", device="cuda")
    prompt = assemble_prompt(captioner.caption(image), default_prompt)
"""

from __future__ import annotations

from .files import CaptionFile, read_captions
from .names import DEFAULT_CAPTIONER, LLAVA_BITS, PINNED_CAPTIONERS
from .prompt import QUESTION, assemble_prompt

__all__ = [
    "DEFAULT_CAPTIONER",
    "LLAVA_BITS",
    "PINNED_CAPTIONERS",
    "QUESTION",
    "CaptionFile",
    "assemble_prompt",
    "check_captioner",
    "load_captioner",
    "read_captions",
]

def __getattr__(name):
    # torch and transformers load only when a captioner does
    if name in ("load_captioner", "check_captioner", "load_from_folder"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'restorecli.captions' has no attribute {name!r}")
