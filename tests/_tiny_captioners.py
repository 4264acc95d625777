"""Tiny random-weight captioner folders, built from their configs with locally built tokenizers and
processors, saved with `save_pretrained` exactly like the pinned models' folders (no downloads).

* `llava_folder(dir)`: LlavaForConditionalGeneration (CLIP vision 28 px / patch 14 -> 4 image tokens,
  Llama text model), a SentencePiece-style BPE tokenizer (Metaspace, byte fallback, BOS added) with
  `<image>`, a PIL-compatible CLIP image processor (shortest edge 28, centre crop 28, CLIP mean);
* `florence_folder(dir)`: Florence2ForConditionalGeneration (DaViT 2 stages, 32 px -> 4 x 4 + 1 image
  tokens, BART text model), a byte-level BPE tokenizer with `<image>` as image token, Florence2Processor;
* `chat_folder(dir)`: the tiny LLaVA with a LlavaProcessor and a chat template (the generic recipe);
* `StubCaptioner` / `stub_captioner(monkeypatch)`: no model at all, for tests about everything around a
  caption (it describes an image by its size and mean colour), loaded where the pinned ones load.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

WORDS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: \nPlease give me a very short description of "
    "this image. ASSISTANT: What does the image describe? a photo of a cat on a red car near the sea"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llama_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([WORDS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    t.add_tokens(["<image>"], special_tokens=True)
    return t


def _llava_model(tokenizer, seed: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def llava_folder(folder: Path, seed: int = 0) -> Path:
    folder = Path(folder)
    tokenizer = llama_tokenizer()
    _llava_model(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _clip_processor().save_pretrained(folder)
    return folder


def chat_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny LLaVA with a LlavaProcessor and a chat template, for the generic (chat template) recipe,
    loaded with `ChatCaptioner.from_folder` (by model type, `--captioner FOLDER` would pick the llava recipe)."""
    from transformers import LlavaProcessor

    folder = Path(folder)
    tokenizer = llama_tokenizer()
    _llava_model(tokenizer, seed).save_pretrained(folder)
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    LlavaProcessor(image_processor=_clip_processor(), tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=template).save_pretrained(folder)
    return folder


def florence_tokenizer():
    """A byte-level BPE tokenizer (BART's kind) with `<image>` as the processor's image token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([WORDS], trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def florence_folder(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    folder = Path(folder)
    tokenizer = florence_tokenizer()
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, crop_size=None, image_seq_length=17,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    vision = Florence2VisionConfig(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[8, 16], num_heads=[1, 2], num_groups=[1, 2],
                                   window_size=2, projection_dim=16, max_position_embeddings=8, max_temporal_embeddings=4)
    text = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=1100,
                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                      forced_bos_token_id=tokenizer.bos_token_id)
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


class StubCaptioner:
    """A captioner without a model: "an image of W x H, mostly red|green|blue". Records what it saw and
    whether it was held on the device (`on_device`)."""

    revision = "0" * 40

    def __init__(self, name: str = "stub", device="cpu"):
        self.name = name
        self.device = device
        self.seen: list[tuple[int, int]] = []
        self.on_device = False

    @contextlib.contextmanager
    def held(self):
        was, self.on_device = self.on_device, True
        try:
            yield
        finally:
            self.on_device = was

    def caption(self, image) -> str:
        import numpy as np

        with self.held():
            arr = np.asarray(image)[..., :3].astype(np.float64)
            self.seen.append(arr.shape[:2])
            colour = ("red", "green", "blue")[int(arr.reshape(-1, 3).mean(0).argmax())]
            return f"an image of {arr.shape[1]} x {arr.shape[0]}, mostly {colour}"


def stub_captioner(monkeypatch) -> list[StubCaptioner]:
    """Make pipeline loading find and load a StubCaptioner for every captioner but none (no weights, no
    model); returns the list of those loaded."""
    import restorecli.captions.loading as loading

    loaded: list[StubCaptioner] = []

    def locate(choice, **_):
        kind = loading.check_captioner(choice)
        return None if kind == "none" else loading.CaptionerSource(choice, Path("/nonexistent"), "0" * 40)

    def load(folder, *, name, revision=None, device="cpu", llava_bit="4"):
        captioner = StubCaptioner(name, device)
        loaded.append(captioner)
        return captioner

    monkeypatch.setattr(loading, "locate_captioner", locate)
    monkeypatch.setattr(loading, "load_from_folder", load)
    return loaded
