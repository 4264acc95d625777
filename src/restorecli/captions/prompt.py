"""The question every captioner is asked, and how a caption joins the positive prompt.

Upstream (DiffBIR ``diffbir/utils/caption.py LLaVACaptioner``) asks LLaVA for "a very short
description" and ``diffbir/inference/loop.py InferenceLoop.run`` builds the positive prompt as
``", ".join([text for text in [caption, pos_prompt] if text])``; the negative prompt is untouched and
the text encoder's tokenizer cuts the result at 77 tokens (SOT + 75 + EOT).
"""

from __future__ import annotations

__all__ = ["QUESTION", "assemble_prompt"]

#: The official question (``LLaVACaptioner.__init__``); other chat models (a Hub id or folder) get it too.
QUESTION = "Please give me a very short description of this image."


def assemble_prompt(caption: str | None, prompt: str | None) -> str:
    """The positive prompt: caption and prompt joined by ", ", the empty or missing ones left out."""
    return ", ".join(text for text in (caption, prompt) if text)
