"""Captions in the pipeline and on the command line: the caption of the image as read leads the
prompt the text encoder sees, the captioner is off the device during sampling, per-tile captions
condition each tile, `--captions` files, `restore caption`, caption/prompt in JSON lines, prompts.jsonl,
and missing captioner weights failing fast. The tiny reference model with a stub captioner (no
weights), the stand-in pipeline for the CLI plumbing, a tiny Florence-2 folder for `restore caption`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _fake_pipeline
from _tiny_captioners import StubCaptioner, florence_folder
from restorecli.cli.app import main
from restorecli.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def halves(path: Path, size=(24, 16)) -> Path:
    """Left half red, right half blue."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 20, 20)
    arr[:, w // 2:] = (20, 20, 220)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# the pipeline (tiny reference model, stub captioner)


@pytest.fixture(scope="module")
def tiny_pipe(reference_dir):
    from restorecli import DiffBIRPipeline

    return DiffBIRPipeline.from_description(reference_dir / "model_v.json", device="cpu", captioner="none")


@pytest.fixture
def captioned(tiny_pipe, monkeypatch):
    """The tiny pipeline with a stub captioner; records every prompt the text encoder encodes."""
    import restorecli.pipeline.diffbir as diffbir

    captioner = StubCaptioner("stub")
    monkeypatch.setattr(tiny_pipe, "captioner", captioner)
    tiny_pipe._prompt_cache.clear()
    encoded: list[str] = []
    real = diffbir.encode_prompt

    def spy(models, prompts):
        encoded.extend(prompts)
        return real(models, prompts)

    monkeypatch.setattr(diffbir, "encode_prompt", spy)
    yield tiny_pipe, captioner, encoded
    tiny_pipe._prompt_cache.clear()


CALL = dict(upscale=2, steps=2, sampler="edm_euler", cfg=2.0, prompt="a sharp photo", negative_prompt="blurry",
            output_type="pt")


@pytest.mark.slow
def test_the_caption_of_the_image_as_read_reaches_the_text_encoder(captioned, tmp_path):
    pipe, captioner, encoded = captioned
    image = Image.open(halves(tmp_path / "a.png", (30, 20)))
    steps_seen = []
    out = pipe(image, on_step=lambda done, total: steps_seen.append(captioner.on_device), **CALL)
    assert captioner.seen == [(20, 30)]  # the input's size: before stage 1's resize to a 512 short side
    assert out.captions == ["an image of 30 x 20, mostly red"]
    assert out.prompts == ["an image of 30 x 20, mostly red, a sharp photo"]  # upstream's ", ".join
    assert encoded == ["an image of 30 x 20, mostly red, a sharp photo", "blurry"]  # the negative untouched
    assert steps_seen and not any(steps_seen)  # the captioner is off the device while sampling
    # a given caption replaces the captioner; "" means no caption
    encoded.clear()
    assert pipe(image, caption="a cat", **CALL).prompts == ["a cat, a sharp photo"]
    assert pipe(image, caption="", **CALL).prompts == ["a sharp photo"]
    assert len(captioner.seen) == 1 and encoded == ["a cat, a sharp photo", "a sharp photo"]  # "blurry" cached


@pytest.mark.slow
def test_per_tile_captions_condition_each_tile(captioned, tmp_path):
    """A red | blue image sampled in two columns of tiles: the left tiles are captioned red, the right
    ones blue, each tile prompt is encoded once, and the sampler sees one embedding per window."""
    import restorecli.pipeline.diffbir as diffbir

    pipe, captioner, encoded = captioned
    image = Image.open(halves(tmp_path / "b.png", (64, 32)))  # x2 -> 128 x 64 -> stage 1: 1024 x 512
    conds = []
    real_sample = diffbir.sample

    def spy_sample(*args, cond=None, **kwargs):
        conds.append(cond)
        return real_sample(*args, cond=cond, **kwargs)

    diffbir.sample = spy_sample
    try:
        out = pipe(image, tile_captions=True, tile_size=512, tile_stride=512, **CALL)
    finally:
        diffbir.sample = real_sample
    tiles = out.tile_captions[0]
    assert sorted(tiles) == [(0, 64, 0, 64), (0, 64, 64, 128)]
    assert tiles[(0, 64, 0, 64)].endswith("mostly red") and tiles[(0, 64, 64, 128)].endswith("mostly blue")
    assert captioner.seen == [(32, 64), (32, 32), (32, 32)]  # the whole image, then each tile's region
    tile_prompts = [f"{c}, a sharp photo" for c in tiles.values()]
    assert sorted(encoded) == sorted(["an image of 64 x 32, mostly red, a sharp photo", "blurry", *tile_prompts])
    (cond,) = conds
    assert set(cond.tile_txt) == set(tiles)
    for window, caption in tiles.items():
        import torch

        assert torch.equal(cond.tile_txt[window], pipe._prompt_cache[f"{caption}, a sharp photo"])
    # untiled, per-tile captions change nothing: the whole-image caption
    captioner.seen.clear()
    out = pipe(image, tile_captions=True, **CALL)
    assert out.tile_captions == [None] and captioner.seen == [(32, 64)]


def test_tile_captions_need_a_captioner(tiny_pipe):
    with pytest.raises(UsageError, match="`tile_captions` needs a captioner"):
        tiny_pipe(np.zeros((8, 8, 3), np.uint8), tile_captions=True)


# --------------------------------------------------------------------------------------------------
# restore / restore batch (stand-in pipeline with a stub captioner)


def test_json_lines_carry_caption_and_prompt(tmp_path, capsys, monkeypatch):
    _fake_pipeline.install(monkeypatch, captioner=StubCaptioner("fake"))
    src = halves(tmp_path / "a.png")
    code, out, err = run([src, "-o", tmp_path / "b.png", "--json", "--prompt", "sharp"], capsys)
    assert code == 0, err
    record = json.loads(out.splitlines()[0])
    assert record["caption"] == "an image of 24 x 16, mostly red" and record["prompt"] == record["caption"] + ", sharp"
    code, out, err = run([src, "-o", tmp_path / "c.png", "--json", "--stage1-only"], capsys)
    assert code == 0 and json.loads(out.splitlines()[0])["caption"] is None


def test_caption_flag_replaces_the_captioner_and_leads_the_prompt(tmp_path, capsys, monkeypatch):
    stub = StubCaptioner("fake")
    _fake_pipeline.install(monkeypatch, captioner=stub)
    src = halves(tmp_path / "a.png")
    code, out, err = run([src, "-o", tmp_path / "b.png", "--json", "--prompt", "sharp", "--caption", " a red sign "],
                         capsys)
    assert code == 0, err
    record = json.loads(out.splitlines()[0])
    assert (record["caption"], record["prompt"]) == ("a red sign", "a red sign, sharp")
    assert stub.seen == []  # the captioner never ran
    code, out, err = run([src, "-o", tmp_path / "c.png", "--json", "--prompt", "sharp", "--caption", ""], capsys)
    assert code == 0 and json.loads(out.splitlines()[0])["prompt"] == "sharp"  # "": no caption at all
    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"input": str(src), "caption": "x"}) + "\n")
    code, out, err = run([src, "-o", tmp_path / "d.png", "--caption", "y", "--captions", captions], capsys)
    assert code == 2 and "--caption and --captions" in err and not (tmp_path / "d.png").exists()


def test_captions_file_replaces_the_captioner_and_warns_about_missing_entries(tmp_path, capsys, monkeypatch):
    built = _fake_pipeline.install(monkeypatch, captioner=StubCaptioner("fake"))
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b", "c"):
        halves(tmp_path / "scans" / f"{name}.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"input": "scans/a.png", "caption": "a red flag"}) + "\n"
                                      + json.dumps({"input": "scans/b.png", "caption": ""}) + "\n")
    code, out, err = run(["batch", "scans", "--captions", "c.jsonl", "--prompt", "sharp", "-v"], capsys)
    assert code == 0, err
    assert "c.jsonl has no caption for 1 of 3 images (scans/c.png); the florence2 captioner describes them" in " ".join(err.split())
    (pipe,) = built
    assert pipe.given_captions == ["a red flag", "", None]
    assert "caption (from c.jsonl): a red flag" in err and "caption (from fake): an image of 24 x 16" in err
    records = [json.loads(line) for line in (tmp_path / "scans_restored" / "prompts.jsonl").read_text().splitlines()]
    assert [r["input"] for r in records] == ["scans/a.png", "scans/b.png", "scans/c.png"]
    assert records[0] == {"input": "scans/a.png", "output": "scans_restored/a_restored.png", "caption": "a red flag",
                          "prompt": "a red flag, sharp", "negative_prompt": pipe.settings[0].prompts.negative_prompt,
                          "captioner": "c.jsonl", "revision": None}
    assert records[1]["caption"] == "" and records[1]["prompt"] == "sharp"
    assert records[2]["captioner"] == "fake" and records[2]["revision"] == "0" * 40
    # a rerun skips the finished images and records nothing new; a bad captions file stops before any work
    assert run(["batch", "scans", "--captions", "c.jsonl"], capsys)[0] == 0
    assert len((tmp_path / "scans_restored" / "prompts.jsonl").read_text().splitlines()) == 3
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    code, out, err = run(["batch", "scans", "--captions", "bad.jsonl", "--overwrite"], capsys)
    assert code == 2 and "bad.jsonl:1: not a JSON object" in err and len(built) == 1


def test_caption_folder_for_restore(tmp_path, capsys, monkeypatch):
    built = _fake_pipeline.install(monkeypatch)
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "a.txt").write_text("a red flag\n")
    src = halves(tmp_path / "a.png")
    code, out, err = run([src, "-o", tmp_path / "b.png", "--captions", tmp_path / "caps", "--json", "--captioner", "llava"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["prompt"].startswith("a red flag, ")
    assert built[0].given_captions == ["a red flag"]
    assert built[0].load.captioner == "none"  # every image has its caption: no captioner is loaded
    code, out, err = run([src, "-o", tmp_path / "c.png", "--captions", tmp_path / "caps", "--captioner", "llava",
                          "--tile-captions"], capsys)
    assert code == 0 and built[1].load.captioner == "llava"  # the tiles still need it


def test_missing_captioner_weights_fail_fast_with_one_line(reference_dir, tmp_path, capsys, monkeypatch):
    """The default captioner (florence2) without its weights: exit 2 before any image, one line naming the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("RESTORE_WEIGHTS_DIR", raising=False)
    src = halves(tmp_path / "a.png")
    code, out, err = run([src, "-o", tmp_path / "b.png", "--model", reference_dir / "model_v.json", "--upscale", "1"], capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "florence2_model (model.safetensors): not found locally" in lines[0]
    assert "restore weights fetch florence2_model" in err and not (tmp_path / "b.png").exists()


# --------------------------------------------------------------------------------------------------
# restore caption


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    from restorecli.captions.base import quiet_transformers

    with quiet_transformers():
        return florence_folder(tmp_path_factory.mktemp("cap") / "Florence-2-base")


def test_restore_caption_prints_one_caption_per_image(florence, tmp_path, capsys, monkeypatch):
    import restorecli.captions.florence as fl

    monkeypatch.setattr(fl.FlorenceCaptioner, "max_new_tokens", 4)
    monkeypatch.chdir(tmp_path)
    halves(tmp_path / "scans" / "a.png")
    halves(tmp_path / "scans" / "sub" / "b.png", (16, 16))
    (tmp_path / "scans" / "notes.png").write_text("not an image")
    code, out, err = run(["caption", "scans", "-r", "--captioner", florence, "--json", "--device", "cpu"], capsys)
    assert code == 1  # one bad file, the others captioned
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in records] == ["scans/a.png", "scans/notes.png", "scans/sub/b.png"]
    good = [r for r in records if r["caption"] is not None]
    assert len(good) == 2 and all(r["captioner"] == str(florence) and isinstance(r["caption"], str) for r in good)
    assert "error: scans/notes.png: not an image" in err and "2 captioned, 1 failed" in err
    # the file reads back as --captions (the failed line is no entry)
    (tmp_path / "c.jsonl").write_text(out)
    from restorecli.captions import read_captions

    table = read_captions(tmp_path / "c.jsonl")
    assert table.lookup("scans/a.png") == good[0]["caption"] and table.lookup("scans/notes.png") is None
    # plain text: IMAGE: CAPTION; same caption for the same pixels
    code, out, err = run(["caption", "scans/a.png", "--captioner", florence, "--device", "cpu"], capsys)
    assert code == 0 and out == f"scans/a.png: {good[0]['caption']}\n"


def test_restore_caption_errors(tmp_path, capsys, monkeypatch):
    code, out, err = run(["caption", tmp_path, "--captioner", "none"], capsys)
    assert code == 2 and "needs a captioner" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    halves(tmp_path / "a.png")
    code, out, err = run(["caption", tmp_path / "a.png"], capsys)
    assert code == 2 and out == "" and "florence2_model (model.safetensors): not found locally" in err
    code, out, err = run(["caption", tmp_path / "a.png", "--captioner", tmp_path / "nowhere"], capsys)
    assert code == 2 and "`--captioner` " in err and "no such folder" in err
