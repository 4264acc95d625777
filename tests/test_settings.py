"""The settings object: one declaration per setting, one defaults table, and the CLI generated from them.

* every CLI restoration flag maps to exactly one settings field and back, and a value given on the
  command line arrives in that field (through the real CLI, with the stand-in pipeline);
* the defaults table: v2 is spaced/50/cfg 4 with its prompts, face/denoise upscale 1, in the library too;
* the library called with no overrides gives the same pixels as the CLI with no flags, for each version
  (v1, v2, v2.1 with the tiny reference weights standing in for the pinned files) and a custom model;
* the diffusers contract: save_pretrained/from_pretrained round-trips to identical output, to() moves
  and casts the cleaner too, offload hooks refuse with a pointer, no swallowed keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import _fake_pipeline
from _tiny_captioners import stub_captioner
from restorecli.cli.app import app, main
from restorecli.cli.options import FLAG_OF, LOAD_LEAVES, RUN_LEAVES
from restorecli.errors import UsageError
from restorecli.settings import (
    DEFAULT_POS_PROMPT, LoadSettings, RestoreSettings, SettingError, default_settings, flat_settings, leaves,
)
from restorecli.settings.defaults import V2_NEG_PROMPT

#: the options of `restore IMAGE...` that are about files and the terminal, not restoration settings
FILE_OPTIONS = {"output", "overwrite", "suffix", "fmt", "quality", "json_lines", "save_guidance_map", "quiet",
                "verbose", "help", "inputs", "captions", "caption"}


def _image_command():
    import typer

    return typer.main.get_command(app).commands["image"]


def test_every_flag_is_one_setting_and_back():
    command = _image_command()
    options = {p.name: p for p in command.params}
    setting_names = [leaf.name for leaf in LOAD_LEAVES + RUN_LEAVES]
    assert len(setting_names) == len(set(setting_names)), "flat setting names must be unique"
    assert set(options) - FILE_OPTIONS == set(setting_names)
    for leaf in LOAD_LEAVES + RUN_LEAVES:
        assert tuple(options[leaf.name].opts) + tuple(options[leaf.name].secondary_opts) == leaf.spec.flags
    # every flag of the reference CLI cases is one of them (the flag names are a contract)
    from conftest import REFERENCE

    cases = REFERENCE / "cases.json"
    if cases.is_file():
        flags = {a for case in json.loads(cases.read_text())["cases"] for a in case["args"] if a.startswith("--")}
        assert flags <= {f for o in options.values() for f in o.opts}


def _non_default(leaf):
    """A valid value different from the field's default, and how it is written on the command line."""
    special = {
        "model": ("model_v.json", "model_v.json"), "task": ("denoise", "denoise"), "cleaner": ("swinir.pth", "swinir.pth"),
        "weights_dir": ("/tmp", "/tmp"), "device": ("cpu", "cpu"), "precision": ("bf16", "bf16"),
        "sampler": ("edm_lms", "edm_lms"), "start_point": ("cond", "cond"), "captioner": ("llava", "llava"),
        "llava_bit": ("8", "8"),
        "color_fix": ("adain", "adain"), "guidance_loss": ("mse", "mse"), "guidance_space": ("rgb", "rgb"),
        "prompt": ("a cat", "a cat"), "negative_prompt": ("a dog", "a dog"), "upscale": (2.0, "2"),
        "tile_size": (128, "128"), "tile_stride": (64, "64"), "cleaner_tile_size": (128, "128"),
        "cleaner_tile_stride": (64, "64"), "max_memory": (3 * 2**30, "3GB"), "guidance_start": (900, "900"),
        "guidance_stop": (100, "100"), "noise_aug": (5, "5"), "steps": (3, "3"), "seed": (7, "7"),
        "order": (3, "3"), "guidance_repeat": (2, "2"),
        "face_detector": ("retinaface_mobile0.25", "retinaface_mobile0.25"), "face_parser": ("bisenet", "bisenet"),
        "save_faces": ("crops", "crops"),
    }
    if leaf.name in special:
        return special[leaf.name]
    if leaf.default is False:
        return True, None
    if isinstance(leaf.default, float):
        return leaf.default + 0.5, str(leaf.default + 0.5)
    raise AssertionError(f"no test value for {leaf.name}")


def test_a_value_on_the_command_line_arrives_in_its_field(tmp_path, monkeypatch, capsys):
    built = _fake_pipeline.install(monkeypatch)
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    argv, expected = [str(src), "-o", str(tmp_path / "b.png")], {}
    for leaf in LOAD_LEAVES + RUN_LEAVES:
        pair = _non_default(leaf)
        if pair is None:
            continue  # a choice with one value only
        value, text = pair
        argv += [leaf.flag] if text is None else [leaf.flag, text]
        expected[leaf.name] = value
    argv.remove("--stage1-only")  # checked below: it needs no stage-2 options
    expected.pop("stage1_only")
    assert main(argv) == 0, capsys.readouterr().err
    (pipe,) = built
    got = {**dataclasses.asdict(pipe.load), **flat_settings(pipe.settings[0])}
    assert {name: got[name] for name in expected} == expected
    assert main([str(src), "-o", str(tmp_path / "c.png"), "--stage1-only"]) == 0
    assert built[1].stage1_only and built[1].settings[0].stage1_only


def test_setting_errors_are_worded_with_flags_on_the_cli_and_names_in_python(capsys):
    with pytest.raises(SettingError, match="^`restoration_guidance` must be >= 0"):
        RestoreSettings().replace(restoration_guidance=-1)
    assert main(["x.png", "--guidance", "-1"]) == 2
    assert "`--guidance` must be >= 0" in capsys.readouterr().err
    assert FLAG_OF["restoration_guidance"] == "--guidance" and FLAG_OF["tile_stride"] == "--tile-stride"
    assert issubclass(UsageError, ValueError)


def test_guidance_in_the_diffusers_sense_is_refused_with_a_pointer():
    with pytest.raises(UsageError, match="`restoration_guidance`.*`cfg`"):
        RestoreSettings().replace(guidance=7.5)
    with pytest.raises(UsageError, match="did you mean `steps`"):
        RestoreSettings().replace(stpes=3)


def test_the_defaults_table():
    v2 = default_settings("v2", "sr")
    assert (v2.sampler.sampler, v2.sampler.steps, v2.sampler.cfg) == ("spaced", 50, 4.0)
    assert v2.prompts.prompt == "" and v2.prompts.negative_prompt == V2_NEG_PROMPT
    for version in ("v1", "v2.1", "custom"):
        s = default_settings(version, "sr")
        assert (s.sampler.sampler, s.sampler.steps, s.sampler.cfg, s.upscale) == ("edm_dpm++_3m_sde", 10, 6.0, 4.0)
        assert s.prompts.prompt == DEFAULT_POS_PROMPT
    assert default_settings("v2.1", "face").upscale == 1.0 and default_settings("v2", "denoise").upscale == 1.0
    assert default_settings("v2.1", "sr") == RestoreSettings()  # the field defaults are v2.1 sr's
    assert default_settings("my_model.json", "sr") == default_settings("custom", "sr")


def test_settings_are_frozen_and_replace_makes_checked_copies():
    s = RestoreSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.upscale = 2.0
    t = s.replace(steps=4, tile_size=128, restoration_guidance=0.5)
    assert (t.sampler.steps, t.tiles.tile_size, t.guidance.scale) == (4, 128, 0.5) and s.sampler.steps == 10
    with pytest.raises(SettingError, match="multiple of 64"):
        s.replace(tile_size=100)
    assert RestoreSettings().replace(max_memory="1.5GB").tiles.max_memory == int(1.5 * 2**30)
    assert [leaf.name for leaf in leaves(LoadSettings)][:2] == ["model", "task"]


# -- the library and the CLI agree -------------------------------------------------------------------------


def _tiny_stand_ins(monkeypatch, reference_dir, version):
    """Make `--model v1|v2|v2.1` load the tiny reference weights (same architecture family, the diffusion
    spec of that version) instead of the pinned full-size files, which are not on this machine."""
    import restorecli.models.configs as configs
    import restorecli.weights as weights
    from restorecli.models.description import load_model_description

    tiny = load_model_description(reference_dir / ("model_v.json" if version == "v2.1" else "model_eps.json"))
    monkeypatch.setattr(weights, "wiring", lambda v, task: {"cleaner": "c", "sd": "s", "controlnet": "n"})
    monkeypatch.setattr(weights, "resolve", lambda name, **kw: tiny.cleaner if name == "c" else name)
    monkeypatch.setattr(weights, "tokenizer_dir", lambda **kw: tiny.tokenizer)
    monkeypatch.setattr(configs, "full_size_description", lambda v, **kw: tiny)


@pytest.mark.slow
@pytest.mark.parametrize("model, task", [("v1", "sr"), ("v2", "denoise"), ("v2.1", "face"), ("model_v.json", "sr")])
def test_library_without_overrides_equals_the_cli_without_flags(model, task, reference_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """Both read the one defaults table. To keep this affordable, the table's step counts are cut to 2 for
    the test (sampler, cfg, prompts and upscale stay the version's): both sides must follow the change."""
    from restorecli import DiffBIRPipeline
    from restorecli.settings import defaults

    table = {v: dataclasses.replace(d, steps=2) for v, d in defaults.VERSION_DEFAULTS.items()}
    monkeypatch.setattr(defaults, "VERSION_DEFAULTS", table)
    monkeypatch.chdir(reference_dir)
    captioners = stub_captioner(monkeypatch)  # the default captioner (v2: none), without its weights
    if not model.endswith(".json"):
        _tiny_stand_ins(monkeypatch, reference_dir, model)
    src = reference_dir / "inputs" / "sign_37x53.png"
    out = tmp_path / "cli.png"
    args = [str(src), "-o", str(out), "--task", task] + ([] if model == "v2.1" else ["--model", model])
    assert main(args) == 0, capsys.readouterr().err
    if model.endswith(".json"):
        pipe = DiffBIRPipeline.from_description(model, task=task)
    else:
        pipe = DiffBIRPipeline.from_version(model, task=task)
    assert pipe.default_settings == default_settings(model, task)
    assert pipe.default_settings.sampler.steps == 2 and pipe.default_settings.sampler.sampler == table[
        defaults.version_of(model)].sampler
    result = pipe(Image.open(src), output_type="pil")
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(result.images[0]))
    assert [c.name for c in captioners] == ([] if model == "v2" else ["florence2", "florence2"])
    assert result.prompts[0] == ", ".join(t for t in (result.captions[0], pipe.default_settings.prompts.prompt) if t)


def test_constructors_take_one_signature_and_swallow_nothing(reference_dir):
    import inspect

    from restorecli import DiffBIRPipeline

    common = ["task", "cleaner", "weights_dir", "stage1_only", "device", "torch_dtype", "offload", "compile",
              "captioner", "llava_bit"]
    for ctor in (DiffBIRPipeline.from_version, DiffBIRPipeline.from_description):
        params = inspect.signature(ctor).parameters
        assert list(params)[1:] == common and not any(p.kind == p.VAR_KEYWORD for p in params.values())
    with pytest.raises(TypeError):
        DiffBIRPipeline.from_version("v2.1", sampler="ddim")
    with pytest.raises(UsageError, match="unsupported argument"):
        DiffBIRPipeline.from_pretrained(reference_dir, sampler="ddim")


@pytest.fixture(scope="module")
def tiny_pipe(reference_dir):
    from restorecli import DiffBIRPipeline

    return DiffBIRPipeline.from_description(reference_dir / "model_v.json", device="cpu", captioner="none")


CALL = dict(upscale=1, steps=2, sampler="edm_dpm++_2m_sde", cfg=3.0, prompt="a photo", seed=3, output_type="pt")


@pytest.mark.slow
def test_save_pretrained_round_trips_to_identical_output(tiny_pipe, reference_dir, tmp_path):
    from restorecli import DiffBIRPipeline

    photo = Image.open(reference_dir / "inputs" / "blur_45x45.png")
    tiny_pipe.default_settings = default_settings("custom", "sr").replace(steps=2, upscale=1)
    try:
        tiny_pipe.save_pretrained(tmp_path / "saved")
        again = DiffBIRPipeline.from_pretrained(tmp_path / "saved", device="cpu")
        assert again.diffusion == tiny_pipe.diffusion and again.latent_scale_factor == tiny_pipe.latent_scale_factor
        assert again.default_settings == tiny_pipe.default_settings
        assert again.stage1_pipeline == tiny_pipe.stage1_pipeline
        for name in ("unet", "controlnet", "vae", "text_encoder"):
            mine, theirs = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        # Same weights and configs; the outputs agree to float rounding, not bit for bit: the converted
        # weights keep the official checkpoint's memory layout, the reloaded ones are contiguous, and
        # the kernels round differently (measured: 4.7e-6 on this image).
        a = tiny_pipe(photo, **CALL).images
        b = again(photo, **CALL).images
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
        assert torch.allclose(tiny_pipe(photo, output_type="pt").images, again(photo, output_type="pt").images,
                              atol=1e-4, rtol=0)
    finally:
        tiny_pipe.default_settings = default_settings("custom", "sr")
    with pytest.raises(Exception, match="not a saved restorecli pipeline"):
        DiffBIRPipeline.from_pretrained(tmp_path)


def test_to_moves_and_casts_the_cleaner_too(reference_dir):
    from restorecli import DiffBIRPipeline

    pipe = DiffBIRPipeline.from_description(reference_dir / "model_v.json", device="cpu", captioner="none")
    pipe.to("cpu", torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.cleaner.dtype == torch.bfloat16 and pipe.placement.device == torch.device("cpu")
    with pytest.raises(UsageError, match="set_offload"):
        pipe.enable_model_cpu_offload()
    with pytest.raises(UsageError, match="set_offload"):
        pipe.enable_sequential_cpu_offload()
