"""`--captioner HUB_ID|FOLDER`: any image-text-to-text model of transformers (Qwen2.5-VL, SmolVLM, ...).

``AutoModelForImageTextToText`` with the model's own processor and chat template: one user turn of the
image and the official question (``QUESTION``), the generation prompt opened, greedy decoding with 1
beam and at most 512 new tokens (upstream's LLaVA settings), the new tokens decoded without special
tokens and stripped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..errors import SetupError
from .base import ModelCaptioner
from .prompt import QUESTION

__all__ = ["ChatCaptioner"]

MAX_NEW_TOKENS = 512


def chat_dtype(device: torch.device, config) -> torch.dtype | str:
    """The checkpoint's own dtype on accelerators; on the CPU fp16 checkpoints compute in bf16."""
    if device.type != "cpu":
        return "auto"
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if str(stored).removeprefix("torch.") in ("float16", "bfloat16") else torch.float32


class ChatCaptioner(ModelCaptioner):
    """An image-text-to-text model asked the official question through its chat template."""

    max_new_tokens = MAX_NEW_TOKENS

    def __init__(self, model, processor, *, name, revision, device, question: str = QUESTION):
        super().__init__(model, name=name, revision=revision, device=device)
        self.processor = processor
        self.question = question

    @classmethod
    def from_folder(cls, folder: Path, *, name: str, revision: str | None, device: torch.device, config=None):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = config or AutoConfig.from_pretrained(folder)
        try:
            model_class = AutoModelForImageTextToText._model_mapping[type(config)]
        except KeyError:
            raise SetupError(
                f"`captioner` {name}: a {config.model_type!r} model cannot caption images "
                "(transformers has no image-text-to-text class for it)",
                hint="use florence2, llava, or an image-text-to-text model such as Qwen/Qwen2.5-VL-3B-Instruct",
            ) from None
        processor = AutoProcessor.from_pretrained(folder)
        if getattr(processor, "chat_template", None) is None:
            raise SetupError(f"`captioner` {name}: the processor has no chat template, so the question cannot be asked",
                             hint="use a chat (instruct) model, or florence2 / llava")
        model = model_class.from_pretrained(folder, dtype=chat_dtype(device, config)).eval()
        return cls(model, processor, name=name, revision=revision, device=device)

    def inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": self.question}]}]
        return dict(self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"))

    def _caption(self, image: Image.Image) -> str:
        return self.processor.decode(self._generate(self.inputs(image), num_beams=1), skip_special_tokens=True)
