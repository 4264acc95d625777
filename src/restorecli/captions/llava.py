"""`--captioner llava`: upstream DiffBIR's captioner, LLaVA-1.5-7B, as converted for transformers.

Reproduces DiffBIR ``diffbir/utils/caption.py LLaVACaptioner`` (which loads ``liuhaotian/llava-v1.5-7b``
through the original ``llava`` package) on ``LlavaForConditionalGeneration`` (``llava-hf/llava-1.5-7b-hf``):

* the prompt is the ``llava_v1`` conversation (``llava/conversation.py conv_llava_v1``, separator style
  TWO) with one user turn ``<image>\\n`` + the question and an open assistant turn; llava-hf's own chat
  template is another string, so it is not used;
* the ids are built as ``llava/mm_utils.py tokenizer_image_token`` builds them: each text chunk around
  ``<image>`` tokenised on its own, the BOS of later chunks dropped; where upstream puts one image
  index that its model widens to the image features, transformers wants one image token per feature;
* the image is padded to a square with the image processor's mean colour (``expand2square``) and
  preprocessed by the PIL CLIP image processor, as ``process_images`` does for ``image_aspect_ratio pad``;
* greedy decoding, 1 beam, at most 512 new tokens; the text decoded without special tokens, stripped.

``--llava-bit`` 4 (upstream's default: bitsandbytes NF4, double quantisation, fp16 compute) or 8 needs
bitsandbytes and CUDA; elsewhere the model loads in 16 bits with a warning. As upstream, the vision
tower stays unquantized (the original loads it separately in fp16); the projector and the language
model are quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from .base import ModelCaptioner
from .images import expand2square, mean_colour
from .names import LLAVA_BITS
from .prompt import QUESTION

__all__ = ["LLAVA_BITS", "LlavaCaptioner", "SYSTEM", "llava_input_ids", "llava_v1_prompt"]

log = logging.getLogger("restorecli.captions.llava")

#: ``conv_llava_v1.system``
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"
MAX_NEW_TOKENS = 512


def llava_v1_prompt(question: str = QUESTION) -> str:
    """``conv_llava_v1`` with messages [USER: "<image>\\n" + question, ASSISTANT: None]: the system line,
    then " USER: <message> ASSISTANT:" (sep " " after the system and the user turn)."""
    return f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


def llava_input_ids(tokenizer, prompt: str, image_token_id: int, num_image_tokens: int) -> list[int]:
    """``tokenizer_image_token`` with the image placeholder widened to `num_image_tokens` image tokens."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [image_token_id] * num_image_tokens + list(chunk[offset:])
    return ids


def num_image_tokens(config, pixel_values: torch.Tensor) -> int:
    """Image features LLaVA puts in the sequence: one per patch (+ the CLS token with strategy "full")."""
    patch = config.vision_config.patch_size
    h, w = pixel_values.shape[-2:]
    return (h // patch) * (w // patch) + (1 if config.vision_feature_select_strategy == "full" else 0)


def quantization(bits: str, device: torch.device) -> tuple[object | None, str | None]:
    """(a BitsAndBytesConfig, None) for 4 / 8 bits where bitsandbytes can run, else (None, why not)."""
    if bits == "16":
        return None, None
    if device.type != "cuda":
        return None, f"bitsandbytes {bits}-bit runs on CUDA only, this run uses {device.type}"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None, "bitsandbytes is not installed (pip install 'restorecli[llava]')"
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "lm_head"]  # upstream: the CLIP tower loads apart, in fp16
    if bits == "4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip), None
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip), None


def half_dtype(device: torch.device) -> torch.dtype:
    """Upstream's 16 bits are fp16; the CPU computes half precision in bf16 only."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


class LlavaCaptioner(ModelCaptioner):
    """LLaVA-1.5 with upstream's prompt, padding and decoding (module docstring)."""

    max_new_tokens = MAX_NEW_TOKENS

    def __init__(self, model, tokenizer, image_processor, *, name, revision, device, question: str = QUESTION):
        super().__init__(model, name=name, revision=revision, device=device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt = llava_v1_prompt(question)
        self.background = mean_colour(image_processor.image_mean)

    @classmethod
    def from_folder(cls, folder: Path, *, name: str, revision: str | None, device: torch.device, bits: str = "4"):
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from .base import pil_image_processor

        if bits not in LLAVA_BITS:
            raise ValueError(f"`llava_bit` must be one of {', '.join(LLAVA_BITS)}, got {bits!r}")
        config, why_not = quantization(bits, device)
        kwargs: dict = {}
        if config is not None:
            kwargs = {"quantization_config": config, "device_map": {"": device}}
        else:
            if bits != "16":
                stored = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
                log.warning("llava: %s-bit weights need bitsandbytes on CUDA (%s); loading them in 16 bits instead: "
                            "about %.1f GB of memory%s", bits, why_not, stored / 1e9,
                            ", and minutes per caption on a CPU" if device.type == "cpu" else "")
            kwargs = {"dtype": half_dtype(device)}
        model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = pil_image_processor(folder)
        return cls(model, tokenizer, image_processor, name=name, revision=revision, device=device)

    def input_ids(self, pixel_values: torch.Tensor) -> list[int]:
        """The ids fed to the model for one image of these pixel values."""
        n = num_image_tokens(self.model.config, pixel_values)
        return llava_input_ids(self.tokenizer, self.prompt, self.model.config.image_token_id, n)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        square = expand2square(image, self.background)
        return self.image_processor(square, return_tensors="pt").pixel_values

    def _caption(self, image: Image.Image) -> str:
        pixel_values = self.pixel_values(image)
        ids = torch.tensor([self.input_ids(pixel_values)])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        answer = self._generate(dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values),
                                num_beams=1, use_cache=True, pad_token_id=pad)
        return self.tokenizer.decode(answer, skip_special_tokens=True)
