"""`--captioner florence2` (the default): Florence-2 base, native in transformers.

``Florence2ForConditionalGeneration`` (``florence-community/Florence-2-base``, 0.23 B parameters) with
its own processor: the task token ``<CAPTION>`` (the processor turns it into "What does the image
describe?"), the image resized to 768 x 768 without padding, beam search with 3 beams and up to 1024
new tokens as on the model card, the text decoded without special tokens and stripped (what the
processor's "pure_text" post-processing does for caption tasks).

Why ``<CAPTION>``: upstream asks LLaVA for "a very short description", which gives one plain sentence
(typically 10-20 words, e.g. "A man in a suit and tie standing in front of a building."). Florence-2's
``<CAPTION>`` answers in the same form (one sentence naming the main subject: "A green car parked in
front of a yellow building."), while ``<DETAILED_CAPTION>`` writes a paragraph of several sentences
("The image shows a ... In the background ...", 40-80 words) that would fill most of CLIP's 75-token
budget by itself and push the version's default prompt out of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .base import ModelCaptioner

__all__ = ["FlorenceCaptioner", "TASK"]

TASK = "<CAPTION>"
NUM_BEAMS = 3
MAX_NEW_TOKENS = 1024


def florence_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (as the model card), fp32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.float16


class FlorenceCaptioner(ModelCaptioner):
    """Florence-2 with the `<CAPTION>` task (module docstring)."""

    max_new_tokens = MAX_NEW_TOKENS
    num_beams = NUM_BEAMS

    def __init__(self, model, processor, *, name, revision, device, task: str = TASK):
        super().__init__(model, name=name, revision=revision, device=device)
        self.processor = processor
        self.task = task

    @classmethod
    def from_folder(cls, folder: Path, *, name: str, revision: str | None, device: torch.device):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        from .base import backend_kwargs

        model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=florence_dtype(device)).eval()
        processor = AutoProcessor.from_pretrained(folder, **backend_kwargs())
        return cls(model, processor, name=name, revision=revision, device=device)

    def inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The processor's inputs for one image: the task prompt after the image tokens, and the pixels."""
        return dict(self.processor(text=self.task, images=image, return_tensors="pt"))

    def _caption(self, image: Image.Image) -> str:
        return self.processor.decode(self._generate(self.inputs(image), num_beams=self.num_beams), skip_special_tokens=True)
