"""restorecli.captions: upstream's LLaVA input, Florence-2's caption task, chat models, caption files,
tile regions, placement and the pinned captioners, all offline with tiny random-weight models
(tests/_tiny_captioners.py) loaded through the same folder path as the pinned ones."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from _fake_hub import COMMIT, hub, hub_file, use_registry, weights_env  # noqa: F401
from _tiny_captioners import chat_folder, florence_folder, llava_folder
from restorecli import weights
from restorecli.captions import QUESTION, assemble_prompt, load_captioner, read_captions
from restorecli.captions.base import ModelCaptioner
from restorecli.captions.images import as_rgb_image, expand2square, mean_colour
from restorecli.captions.llava import llava_v1_prompt, quantization
from restorecli.captions.tiles import caption_tiles, tile_boxes
from restorecli.errors import SetupError, UsageError, WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model folders, built once per module."""
    from restorecli.captions.base import quiet_transformers

    root = tmp_path_factory.mktemp("captioners")
    with quiet_transformers():
        return SimpleNamespace(llava=llava_folder(root / "llava-1.5-7b-hf"), florence=florence_folder(root / "Florence-2-base"),
                               chat=chat_folder(root / "chat"))


def photo(w=40, h=20):
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (200, 30, 30)
    arr[:, w // 2:] = (20, 40, 220)
    return Image.fromarray(arr)


class Recorder:
    """Stands in for `model.generate`: records the call, returns the prompt + `reply` ids (or runs the
    real generate with a small token budget when `real`)."""

    def __init__(self, model, reply=None, real=False, budget=6):
        self.model, self.reply, self.real, self.budget = model, reply, real, budget
        self.original = model.generate
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.real:
            return self.original(**{**kwargs, "max_new_tokens": self.budget})
        prompt = kwargs["input_ids"] if not self.model.config.is_encoder_decoder else kwargs["input_ids"][:, :0]
        return torch.cat([prompt, torch.tensor([self.reply])], dim=1)


# --------------------------------------------------------------------------------------------------
# the prompt


def test_llava_v1_prompt_is_upstreams_string_character_for_character():
    assert QUESTION == "Please give me a very short description of this image."
    assert llava_v1_prompt() == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\n"
        "Please give me a very short description of this image. ASSISTANT:"
    )


@pytest.mark.parametrize("caption, prompt, expected", [
    ("a cat on a car", "high quality", "a cat on a car, high quality"),
    ("", "high quality", "high quality"),
    (None, "high quality", "high quality"),
    ("a cat on a car", "", "a cat on a car"),
    ("", "", ""),
])
def test_prompt_assembly_is_upstreams(caption, prompt, expected):
    assert assemble_prompt(caption, prompt) == expected


def test_assembled_prompt_token_ids(tokenizer_dir):
    """CLIP ids of the joined string (SOT 49406, a 320, photo 1125, of 539, cat 2368, ',' 267, dog 1929,
    EOT 49407, zero padding), and the 77-token cut of the whole assembled prompt, EOT kept last, as
    upstream's OpenCLIP tokenize cuts it: a long caption pushes the prompt out."""
    from transformers import CLIPTokenizer

    from restorecli.models.cldm import tokenize

    models = SimpleNamespace(tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), max_length=77)
    ids = tokenize(models, [assemble_prompt("a photo of a cat", "a dog")])[0].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 267, 320, 1929, 49407] + [0] * 67
    long = tokenize(models, [assemble_prompt("a cat " * 40, "a dog")])[0].tolist()
    assert long == [49406] + [320, 2368] * 37 + [320, 49407]


# --------------------------------------------------------------------------------------------------
# images


def test_expand2square_pads_with_the_mean_colour_centred():
    background = mean_colour(CLIP_MEAN)
    assert background == (122, 116, 104)  # the colour upstream's conversation.py hard-codes
    wide = np.asarray(expand2square(Image.new("RGB", (6, 4), (255, 0, 0)), background))
    assert wide.shape == (6, 6, 3)
    assert (wide[[0, 5]] == background).all() and (wide[1:5] == (255, 0, 0)).all()
    tall = np.asarray(expand2square(Image.new("RGB", (3, 6), (0, 255, 0)), background))
    assert tall.shape == (6, 6, 3)
    assert (tall[:, [0, 4, 5]] == background).all() and (tall[:, 1:4] == (0, 255, 0)).all()
    square = Image.new("RGB", (5, 5))
    assert expand2square(square, background) is square


def test_images_become_8_bit_rgb():
    u16 = np.full((2, 3, 4), 65535, np.uint16)
    u16[..., 0] = 257 * 100
    assert np.asarray(as_rgb_image(u16)).tolist() == [[[100, 255, 255]] * 3] * 2  # alpha dropped
    floats = np.full((1, 2), 0.5, np.float32)
    assert np.asarray(as_rgb_image(floats)).tolist() == [[[128, 128, 128]] * 2]
    assert as_rgb_image(Image.new("L", (2, 2), 9)).mode == "RGB"


# --------------------------------------------------------------------------------------------------
# llava: upstream's input


def test_llava_ids_and_pixels_fed_to_the_model(tiny, caplog):
    with caplog.at_level(logging.WARNING, "restorecli.captions"):
        captioner = load_captioner(str(tiny.llava))  # --llava-bit 4 by default
    assert type(captioner).__name__ == "LlavaCaptioner"
    # the documented path without bitsandbytes and CUDA: 16 bits (bf16 on the CPU), one warning line
    assert captioner.model.dtype == torch.bfloat16
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "4-bit weights need bitsandbytes on CUDA" in notices[0] and "16 bits" in notices[0]
    assert "\n" not in notices[0]

    tok, model = captioner.tokenizer, captioner.model
    reply = tok(" a red car").input_ids[1:] + [tok.eos_token_id]
    model.generate = recorder = Recorder(model, reply=reply)
    image = Image.new("RGB", (28, 14), (200, 30, 30))  # wide: padded above and below
    assert captioner.caption(image) == "a red car"
    (call,) = recorder.calls
    image_id = model.config.image_token_id
    expected = (
        tok("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions. USER: ").input_ids
        + [image_id] * 4  # (28 / 14)^2 patches, CLS dropped (strategy "default")
        + tok("\nPlease give me a very short description of this image. ASSISTANT:").input_ids[1:]  # BOS dropped
    )
    assert call["input_ids"].tolist() == [expected]
    assert expected[0] == tok.bos_token_id and expected.count(tok.bos_token_id) == 1
    assert call["attention_mask"].tolist() == [[1] * len(expected)]
    assert (call["do_sample"], call["num_beams"], call["max_new_tokens"]) == (False, 1, 512)
    # pixels: the square-padded image, CLIP-normalised: 7 rows of mean colour, 14 red, 7 mean colour
    pixels = call["pixel_values"].float()
    assert pixels.shape == (1, 3, 28, 28)
    pad = [(c / 255 - m) / s for c, m, s in zip((122, 116, 104), CLIP_MEAN, CLIP_STD)]
    red = [(c / 255 - m) / s for c, m, s in zip((200, 30, 30), CLIP_MEAN, CLIP_STD)]
    for row, colour in ((0, pad), (6, pad), (7, red), (20, red), (21, pad), (27, pad)):
        assert pixels[0, :, row, :].mean(dim=1).tolist() == pytest.approx(colour, abs=0.02), row


def test_llava_greedy_decoding_is_deterministic_and_greedy(tiny):
    captioner = load_captioner(str(tiny.llava), llava_bit="16")
    model = captioner.model
    model.generate = recorder = Recorder(model, real=True, budget=5)
    image = photo()
    first = captioner.caption(image)
    captioner._cache.clear()
    assert captioner.caption(image) == first and len(recorder.calls) == 2
    # the same tokens as an argmax loop over the model's logits
    call = recorder.calls[0]
    ids, pixels = call["input_ids"], call["pixel_values"]
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if ids[0, -1] == model.config.text_config.eos_token_id:
                break
    assert first == captioner.tokenizer.decode(ids[0, call["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_llava_bits_quantization_settings(monkeypatch):
    config, why = quantization("4", torch.device("cpu"))
    assert config is None and "CUDA only" in why
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    config, why = quantization("4", torch.device("cuda"))
    assert config is None and "bitsandbytes is not installed" in why
    monkeypatch.setitem(sys.modules, "bitsandbytes", SimpleNamespace())
    config, why = quantization("4", torch.device("cuda"))
    assert why is None and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.float16
    assert "vision_tower" in config.llm_int8_skip_modules
    config, _ = quantization("8", torch.device("cuda"))
    assert config.load_in_8bit
    assert quantization("16", torch.device("cuda")) == (None, None)
    with pytest.raises(UsageError, match="`llava_bit` must be one of 4, 8, 16"):
        load_captioner("llava", llava_bit="2")


# --------------------------------------------------------------------------------------------------
# florence2 and chat models


def test_florence_caption_task_and_decoding(tiny):
    captioner = load_captioner(str(tiny.florence))
    assert type(captioner).__name__ == "FlorenceCaptioner" and captioner.model.dtype == torch.float32
    tok = captioner.processor.tokenizer
    reply = [tok.eos_token_id, tok.bos_token_id] + tok(" a photo of a cat ", add_special_tokens=False).input_ids + [tok.eos_token_id]
    model = captioner.model
    model.generate = recorder = Recorder(model, reply=reply)
    assert captioner.caption(photo()) == "a photo of a cat"
    (call,) = recorder.calls
    ids = call["input_ids"][0].tolist()
    assert ids[:17] == [tok.image_token_id] * 17 and tok.image_token_id not in ids[17:]
    assert tok.decode(ids[17:]) == "<s>What does the image describe?</s>"  # the <CAPTION> task
    assert call["pixel_values"].shape == (1, 3, 32, 32)
    assert (call["do_sample"], call["num_beams"], call["max_new_tokens"]) == (False, 3, 1024)


def test_florence_is_deterministic(tiny):
    captioner = load_captioner(str(tiny.florence))
    captioner.max_new_tokens = 6
    a = captioner.caption(photo())
    captioner._cache.clear()
    assert captioner.caption(photo()) == a


def test_chat_model_gets_the_question_through_its_template(tiny):
    from restorecli.captions.generic import ChatCaptioner

    captioner = ChatCaptioner.from_folder(tiny.chat, name="chat", revision=None, device=torch.device("cpu"))
    tok = captioner.processor.tokenizer
    model = captioner.model
    model.generate = recorder = Recorder(model, reply=tok(" a cat").input_ids[1:] + [tok.eos_token_id])
    assert captioner.caption(photo()) == "a cat"
    (call,) = recorder.calls
    text = tok.decode(call["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("USER: " + "<image>" * 4 + "\nPlease give me a very short description of this image. ASSISTANT:")
    assert (call["do_sample"], call["num_beams"], call["max_new_tokens"]) == (False, 1, 512)


def test_models_that_cannot_caption_are_one_line_setup_errors(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    for choice, error, text in (
        (tmp_path / "gpt2", SetupError, "a 'gpt2' model cannot caption images"),
        (tmp_path / "empty", SetupError, "has no config.json"),
        (tmp_path / "file.bin", UsageError, "not a folder"),
        (tmp_path / "nowhere", UsageError, "no such folder, and not a captioner name or a Hub id"),
    ):
        with pytest.raises(error, match=text) as info:
            load_captioner(str(choice))
        assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert load_captioner("none") is None


def test_hub_ids_offline_are_one_line_weights_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match=r"`captioner` someone/tiny-vlm: cannot get the model .*HF_HUB_OFFLINE") as info:
        load_captioner("someone/tiny-vlm")
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------------------
# placement and reuse


class _StubModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.moves = []
        self.place = torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def to(self, device):
        self.moves.append(torch.device(device).type)
        self.place = torch.device(device)
        return self


class _StubCaptioner(ModelCaptioner):
    def model_device(self):
        return self.model.place

    def _caption(self, image):
        self.seen = getattr(self, "seen", []) + [self.model_device().type]
        return f" {image.size[0]}x{image.size[1]} "


def test_the_model_is_on_the_accelerator_only_while_it_captions():
    model = _StubModel()
    captioner = _StubCaptioner(model, name="stub", revision=None, device="cuda")
    assert captioner.caption(photo()) == "40x20"
    assert captioner.seen == ["cuda"] and model.moves == ["cuda", "cpu"] and captioner.model_device().type == "cpu"
    with captioner.held():
        captioner.caption(photo(10, 10))
        captioner.caption(photo(12, 10))
        assert captioner.model_device().type == "cuda"
    assert model.moves == ["cuda", "cpu", "cuda", "cpu"]
    # identical images (same pixels) are captioned once
    assert captioner.caption(photo()) == "40x20" and len(captioner.seen) == 3


def test_tile_captions_caption_each_region_once():
    model = _StubModel()
    captioner = _StubCaptioner(model, name="stub", revision=None, device="cpu")
    calls = []

    def colour(image):
        calls.append(image.size)
        r, g, b = np.asarray(image).reshape(-1, 3).mean(0)
        return "red" if r > b else "blue"

    captioner._caption = colour
    boxes = {(0, 8, 0, 8): (0, 0, 20, 20), (0, 8, 4, 12): (20, 0, 40, 20), (8, 16, 0, 8): (0, 0, 20, 20)}
    assert caption_tiles(captioner, photo(), boxes) == {(0, 8, 0, 8): "red", (0, 8, 4, 12): "blue", (8, 16, 0, 8): "red"}
    assert calls == [(20, 20), (20, 20)]


def test_tile_boxes_map_latent_windows_to_input_pixels():
    # input 16 x 24, condition 64 x 96 (x4), latent 8 x 12
    assert tile_boxes([(0, 8, 0, 8), (0, 8, 4, 12)], cond_size=(64, 96), input_size=(16, 24)) == {
        (0, 8, 0, 8): (0, 0, 16, 16), (0, 8, 4, 12): (8, 0, 24, 16)}
    # input 15 x 23, condition 60 x 92 padded to the 64 x 96 the latent covers: the padding is dropped
    assert tile_boxes([(0, 8, 0, 8), (0, 8, 4, 12)], cond_size=(60, 92), input_size=(15, 23)) == {
        (0, 8, 0, 8): (0, 0, 16, 15), (0, 8, 4, 12): (8, 0, 23, 15)}
    # upscaled x3 to a 512 short side from 10 x 7: fractional edges widen to whole pixels
    assert tile_boxes([(16, 48, 0, 32)], cond_size=(512, 731), input_size=(7, 10)) == {(16, 48, 0, 32): (0, 1, 4, 6)}


# --------------------------------------------------------------------------------------------------
# caption files


def test_jsonl_captions_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    lines = [
        {"input": "scans/a.png", "caption": " a cat \n", "captioner": "florence2"},
        {"input": str(tmp_path / "scans" / "b.png"), "caption": "a dog"},
        {"input": "scans/c.png", "caption": ""},
        {"input": "scans/a.png", "caption": "a cat"},  # the same again: fine
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    captions = read_captions("c.jsonl")
    assert captions.lookup("scans/a.png") == "a cat"
    assert captions.lookup("./scans//a.png") == "a cat"
    assert captions.lookup(tmp_path / "scans" / "a.png") == "a cat"
    assert captions.lookup("scans/b.png") == "a dog"
    assert captions.lookup("scans/c.png") == ""
    assert captions.lookup("scans/d.png") is None


@pytest.mark.parametrize("text, message", [
    ('{"input": "a.png", "caption": "x"}\nnot json\n', r"c.jsonl:2: not a JSON object"),
    ('{"input": "a.png"}\n', r'c.jsonl:1: each line needs "input" and "caption" strings'),
    ('["a.png", "x"]\n', r"c.jsonl:1: each line needs"),
    ('{"input": "a.png", "caption": "x"}\n{"input": "a.png", "caption": "y"}\n',
     r"c.jsonl:2: a second, different caption for a.png \(first on line 1\)"),
])
def test_bad_caption_files_name_the_file_and_line(tmp_path, text, message):
    (tmp_path / "c.jsonl").write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        read_captions(tmp_path / "c.jsonl")
    assert info.value.exit_code == 2


def test_caption_folder_by_relative_path_then_stem(tmp_path):
    (tmp_path / "caps" / "sub").mkdir(parents=True)
    (tmp_path / "caps" / "b.txt").write_text("a dog\n")
    (tmp_path / "caps" / "sub" / "b.txt").write_text("a bird")
    captions = read_captions(tmp_path / "caps")
    assert captions.lookup("scans/sub/b.png", relative="sub/b.png") == "a bird"
    assert captions.lookup("scans/b.png", relative="b.png") == "a dog"
    assert captions.lookup("elsewhere/b.jpg") == "a dog"
    assert captions.lookup("scans/c.png", relative="c.png") is None
    (tmp_path / "caps" / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match=r"bad.txt: not UTF-8"):
        read_captions(tmp_path / "caps")
    with pytest.raises(UsageError, match="missing.jsonl: no such caption file or folder"):
        read_captions(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------
# pinned captioners: weights.toml, downloads, missing files


def test_shipped_captioners_are_pinned():
    assert weights.captioner_names() == ["florence2", "llava"]
    reg = weights.registry()
    florence = reg.expand(["florence2"])
    assert {e.repo for e in florence} == {"florence-community/Florence-2-base"}
    assert {e.revision for e in florence} == {"00921df66db728a9ceb750f5eca43e5c203a2051"}
    assert reg.get("florence2_model").sha256 == "62f3e696da74f8869a68ddb529a9b3e14eb25b21c592cb3dea6179bf944df6a0"
    llava = reg.expand(["llava"])
    assert {e.revision for e in llava} == {"b234b804b114d9e37bb655e11cbbb5f5e971b7a9"}
    assert sorted(e.file for e in llava if e.file.endswith(".safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(e.kind == "captioner" for e in florence + llava)


def _serve_folder(hub, folder: Path, group: str, repo: str) -> list[dict]:
    files = []
    for i, path in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        entry = hub_file(hub, f"{group}_{i}", path.read_bytes(), filename=path.name, repo=repo, pin_sha=path.suffix == ".safetensors")
        files.append({**entry, "kind": "captioner"})
    return files


def test_pinned_captioner_downloads_and_loads_from_its_folder(hub, tiny, weights_env):
    files = _serve_folder(hub, tiny.florence, "florence2", "test-org/Florence-2-base")
    use_registry(*files, groups={"florence2": [f["name"] for f in files]})
    captioner = load_captioner("florence2")
    assert type(captioner).__name__ == "FlorenceCaptioner" and captioner.revision == COMMIT
    folder = weights.captioner_dir("florence2", download=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny.florence.iterdir() if p.is_file())
    captioner.max_new_tokens = 4
    assert isinstance(captioner.caption(photo()), str)


def test_missing_captioner_weights_fail_fast_with_one_line(hub, tiny, weights_env, monkeypatch):
    files = _serve_folder(hub, tiny.florence, "florence2", "test-org/Florence-2-base")
    use_registry(*files, groups={"florence2": [f["name"] for f in files]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        load_captioner("florence2")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert "not found locally" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    assert hub.requests == []


def test_weights_dir_copy_must_sit_in_a_folder_named_after_the_repo(hub, tiny, weights_env, tmp_path):
    import shutil

    files = _serve_folder(hub, tiny.florence, "florence2", "test-org/Florence-2-base")
    use_registry(*files, groups={"florence2": [f["name"] for f in files]})
    wdir = tmp_path / "models"
    (wdir / "other").mkdir(parents=True)
    (wdir / "other" / "config.json").write_text("{}")  # someone else's config.json: not taken
    shutil.copytree(tiny.florence, wdir / "Florence-2-base")
    folder = weights.captioner_dir("florence2", weights_dir=wdir)
    assert folder == wdir / "Florence-2-base" and hub.requests == []
