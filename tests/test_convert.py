"""Configs from DiffBIR's vocabulary, official-layout conversion (tiny and full size), conversion cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch

from conftest import load_golden
from restorecli import weights
from restorecli.errors import SetupError, WeightsError
from restorecli.models import configs as cfgs
from restorecli.models import convert as cv
from restorecli.models import stage2
from restorecli.models.description import load_model_description
from restorecli.weights import hashing


# ---------------------------------------------------------------------------------------------- configs


def test_full_size_configs_are_sd21_base():
    c = cfgs.stage2_configs(cfgs.full_size_cldm_spec("sd.ckpt", "cn.pth"))
    # the values of the diffusers-format SD 2.1 base repo (weights-facts.md)
    assert c.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert c.unet["attention_head_dim"] == (5, 10, 20, 20)
    assert c.unet["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert c.unet["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (c.unet["cross_attention_dim"], c.unet["use_linear_projection"], c.unet["layers_per_block"]) == (1024, True, 2)
    assert (c.unet["flip_sin_to_cos"], c.unet["freq_shift"]) == (True, 0)
    assert c.vae["block_out_channels"] == (128, 256, 512, 512) and c.vae["latent_channels"] == 4
    assert c.vae["scaling_factor"] == pytest.approx(0.18215)
    t = c.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.hidden_act) == (1024, 23, 16, "gelu")
    assert (t.vocab_size, t.max_position_embeddings, t.intermediate_size) == (49408, 77, 4096)
    assert c.controlnet["in_channels"] + c.controlnet["conditioning_channels"] == 8
    assert c.controlnet["num_attention_heads"] == (5, 10, 20, 20)


def test_tiny_configs(reference_dir):
    c = cfgs.stage2_configs(load_model_description(reference_dir / "model_v.json").cldm)
    # attention_resolutions [1] with channel_mult [1, 2]: attention at the first level only
    assert c.unet["down_block_types"] == ("CrossAttnDownBlock2D", "DownBlock2D")
    assert c.unet["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D")
    # num_head_channels 16: heads = channels // 16
    assert c.unet["attention_head_dim"] == (2, 4) and c.controlnet["num_attention_heads"] == (2, 4)
    assert c.text.num_hidden_layers == 1 and c.text_layers_in_checkpoint == 2


def test_pinned_versions():
    assert cfgs.PINNED_DIFFUSION["v1"].parameterization == "eps"
    assert cfgs.PINNED_DIFFUSION["v2"].zero_snr is False
    d = cfgs.full_size_description("v2.1", sd_checkpoint="a", controlnet_checkpoint="b", tokenizer="tok")
    assert (d.diffusion.parameterization, d.diffusion.zero_snr) == ("v", True)
    with pytest.raises(SetupError, match="v3"):
        cfgs.full_size_description("v3", sd_checkpoint="a", controlnet_checkpoint="b", tokenizer="tok")


@pytest.mark.parametrize("change, words", [
    ({"resblock_updown": True}, "unet_cfg.resblock_updown"),
    ({"use_spatial_transformer": False}, "unet_cfg.use_spatial_transformer"),
    ({"num_head_channels": 24}, "num_head_channels"),
    ({"bogus": 1}, "unknown keys: bogus"),
])  # fmt: skip
def test_unsupported_unet_options_are_named(change, words):
    unet_cfg = {**cfgs.FULL_SIZE_CLDM_PARAMS["unet_cfg"], **change}
    with pytest.raises(SetupError, match=words):
        cfgs.unet_config_from_ldm(unet_cfg)


def test_unsupported_vae_and_clip_options():
    vae = cfgs.FULL_SIZE_CLDM_PARAMS["vae_cfg"]
    with pytest.raises(SetupError, match="attn_resolutions"):
        cfgs.vae_config_from_ldm({**vae, "ddconfig": {**vae["ddconfig"], "attn_resolutions": [16]}})
    clip = cfgs.FULL_SIZE_CLDM_PARAMS["clip_cfg"]
    with pytest.raises(SetupError, match="layer"):
        cfgs.text_config_from_ldm({**clip, "layer": "pooled"})


# ------------------------------------------------------------------------------ full-size conversion


def _meta_state_dict(layout: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}


@pytest.fixture(scope="module")
def full_size():
    configs = cfgs.stage2_configs(cfgs.full_size_cldm_spec("sd.ckpt", "cn.pth"))
    return configs, stage2.empty_models(configs)


def test_full_size_sd_checkpoint_maps_completely(reference_dir, full_size):
    configs, models = full_size
    layout = json.loads((reference_dir / "manifest_full.json").read_text())["layouts"]["sd2.1_ldm_ckpt"]
    sd = _meta_state_dict(layout)
    parts = {
        "unet": cv.convert_unet(sd, configs.unet),
        "vae": cv.convert_vae(sd, configs.vae),
        "text_encoder": cv.convert_text_encoder(sd, configs.text, target_keys=cv.shapes_of(models["text_encoder"])),
    }
    for name, converted in parts.items():  # raises on any missing / unexpected key or shape difference
        cv.check_state_dict(converted, cv.shapes_of(models[name]), what=name, source="manifest_full.json")
    # every official tensor was used, except what the penultimate-layer text encoder never runs
    unused_text = {k for k in sd if k.startswith("cond_stage_model.model.transformer.resblocks.23.")}
    unused_text |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    n_unet = sum(k.startswith(cv.UNET_PREFIX) for k in sd)
    n_vae = sum(k.startswith(cv.VAE_PREFIX) for k in sd)
    assert len(parts["unet"]) == n_unet and len(parts["vae"]) == n_vae
    n_text_used = sum(k.startswith(cv.TEXT_PREFIX) for k in sd) - len(unused_text)
    assert len(parts["text_encoder"]) == n_text_used + 23 * 4  # in_proj weight/bias -> q, k, v
    assert sum(p.numel() for p in models["unet"].parameters()) == sum(v.numel() for v in parts["unet"].values())


def test_full_size_controlnet_maps_completely(reference_dir, full_size):
    configs, models = full_size
    layout = json.loads((reference_dir / "manifest_full.json").read_text())["layouts"]["irControlNet"]
    sd = _meta_state_dict(layout)
    converted = cv.convert_controlnet(sd, configs.controlnet)
    cv.check_state_dict(converted, cv.shapes_of(models["controlnet"]), what="controlnet", source="manifest")
    assert len(converted) == len(sd)
    assert models["controlnet"].num_down_residuals == 12


def test_check_state_dict_names_the_problem():
    expected = {"a": (2,), "b": (3,)}
    with pytest.raises(WeightsError, match=r"x\.ckpt: unet .* 1 missing \(b\); 1 unexpected \(c\)"):
        cv.check_state_dict({"a": torch.zeros(2), "c": torch.zeros(1)}, expected, what="unet", source="x.ckpt")
    with pytest.raises(WeightsError, match=r"a: \(4,\) in the file, \(2,\) expected"):
        cv.check_state_dict({"a": torch.zeros(4), "b": torch.zeros(3)}, expected, what="unet", source="x.ckpt")


# ---------------------------------------------------------------------------------- loading errors


def test_missing_and_wrong_checkpoints_are_weights_errors(reference_dir, tokenizer_dir, tmp_path):
    import dataclasses

    desc = load_model_description(reference_dir / "model_v.json")
    missing = dataclasses.replace(desc, cldm=dataclasses.replace(desc.cldm, sd_checkpoint=tmp_path / "nope.ckpt"))
    with pytest.raises(WeightsError, match="nope.ckpt: Stable Diffusion checkpoint not found"):
        stage2.load_stage2(missing, use_cache=False)
    swapped = dataclasses.replace(
        desc, cldm=dataclasses.replace(desc.cldm, sd_checkpoint=reference_dir / "controlnet.safetensors")
    )
    with pytest.raises(WeightsError, match="controlnet.safetensors: not an SD ldm checkpoint"):
        stage2.load_stage2(swapped, use_cache=False)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    bad = dataclasses.replace(desc, cldm=dataclasses.replace(desc.cldm, controlnet_checkpoint=garbage))
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        stage2.load_stage2(bad, use_cache=False)


# ----------------------------------------------------------------------------------- conversion cache


def _outputs(models, reference_dir):
    g, _ = load_golden(reference_dir, "denoiser")
    return models.controlled_unet()(g["x_t"], g["t"], g["c_txt"], g["c_img"], 0.7)


def test_conversion_cache_written_once_and_reused(reference_dir, tokenizer_dir, tmp_path, monkeypatch):
    desc = load_model_description(reference_dir / "model_v.json")
    first = stage2.load_stage2(desc, cache_dir=tmp_path)
    assert first.load_report["sd"]["from"] == "converted" and first.load_report["sd"]["cached"]
    entries = list(cv.iter_entries(tmp_path))
    assert sorted(e.name.split("-")[0] for e in entries) == ["controlnet", "sd"]
    assert all(e.name.endswith(f"-c{cv.CONVERTER_VERSION}") for e in entries)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temp folders left
    stamps = {p: p.stat().st_mtime_ns for e in entries for p in e.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("the converter ran although the cache has the weights")

    for name in ("read_checkpoint", "convert_unet", "convert_vae", "convert_text_encoder", "convert_controlnet"):
        monkeypatch.setattr(cv, name, no_conversion)
    second = stage2.load_stage2(desc, cache_dir=tmp_path)
    assert second.load_report["sd"]["from"] == "cache" and second.load_report["controlnet"]["from"] == "cache"
    assert {p: p.stat().st_mtime_ns for e in entries for p in e.iterdir()} == stamps
    # zero-copy: the cached weights are memory-mapped at 64-byte aligned addresses
    assert all(p.data_ptr() % cv.ALIGN == 0 for p in second.unet.parameters())
    assert torch.equal(_outputs(first, reference_dir), _outputs(second, reference_dir))


def test_damaged_cache_entry_is_rebuilt(reference_dir, tokenizer_dir, tmp_path):
    desc = load_model_description(reference_dir / "model_eps.json")
    stage2.load_stage2(desc, cache_dir=tmp_path)
    (entry,) = [e for e in cv.iter_entries(tmp_path) if e.name.startswith("controlnet-")]
    (entry / "controlnet.safetensors").write_bytes(b"truncated")
    again = stage2.load_stage2(desc, cache_dir=tmp_path)
    assert again.load_report["controlnet"]["from"] == "converted"
    assert stage2.load_stage2(desc, cache_dir=tmp_path).load_report["controlnet"]["from"] == "cache"


def test_cache_entries_are_keyed_through_the_weights_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORE_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    cache = cv.ConversionCache(tmp_path / "cache")
    entry = cache.entry("sd", f, "cfg")
    # sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
    assert entry.name == f"sd-ba7816bf8f01cfea-cfg-c{cv.CONVERTER_VERSION}"
    with monkeypatch.context() as m:
        m.setattr(hashing, "sha256_file", lambda *a: (_ for _ in ()).throw(AssertionError("re-hashed")))
        assert cache.entry("sd", f, "cfg") == entry
    f.write_bytes(b"abcd")  # new size -> hashed again
    assert cache.entry("sd", f, "cfg") != entry
    with pytest.raises(WeightsError, match=r"nope.bin: cannot read checkpoint \(No such file"):
        cache.entry("sd", tmp_path / "nope.bin", "cfg")


def test_first_load_hashes_each_checkpoint_once(reference_dir, tokenizer_dir, tmp_path, monkeypatch):
    """resolve verifies a checkpoint seen for the first time and the conversion cache keys its entry
    by the same sha256: one hashing per file, not one for each."""
    monkeypatch.setenv("RESTORE_HOME", str(tmp_path / "home"))  # an empty hash cache
    desc = load_model_description(reference_dir / "model_v.json")
    sources = {"sd": desc.cldm.sd_checkpoint, "cn": desc.cldm.controlnet_checkpoint}
    folder = tmp_path / "weights"
    folder.mkdir()
    pins = []
    for name, src in sources.items():
        shutil.copyfile(src, folder / src.name)
        data = src.read_bytes()
        pins.append({
            "name": name, "kind": "sd", "description": "tiny", "license": "MIT", "file": src.name,
            "url": f"https://example.invalid/{src.name}", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        })  # fmt: skip
    hashes = []  # every sha256 computed from here on, with the bytes it was fed by update()
    real = hashlib.sha256

    class Counting:
        def __init__(self, *args, **kwargs):
            self._h, self.fed = real(*args, **kwargs), 0
            hashes.append(self)

        def update(self, data):
            self.fed += len(data)
            self._h.update(data)

        def __getattr__(self, name):
            return getattr(self._h, name)

    monkeypatch.setattr(hashlib, "sha256", Counting)
    previous = weights.set_registry(weights.Registry.from_dict({"file": pins}))
    try:
        sd = weights.resolve("sd", weights_dir=folder, download=False)
        cn = weights.resolve("cn", weights_dir=folder, download=False)
    finally:
        weights.set_registry(previous)
    assert (sd.parent, cn.parent) == (folder, folder)
    fresh = dataclasses.replace(desc, cldm=dataclasses.replace(desc.cldm, sd_checkpoint=sd, controlnet_checkpoint=cn))
    models = stage2.load_stage2(fresh, cache_dir=tmp_path / "converted")
    assert models.load_report["sd"]["from"] == "converted" and models.load_report["sd"]["cached"]
    assert sorted(h.fed for h in hashes if h.fed) == sorted(p["size"] for p in pins)  # each file once
    names = sorted(e.name for e in cv.iter_entries(tmp_path / "converted"))
    assert [n.split("-")[:2] for n in names] == [["controlnet", pins[1]["sha256"][:16]], ["sd", pins[0]["sha256"][:16]]]


def test_aligned_safetensors_are_standard_and_aligned(tmp_path):
    from safetensors import safe_open

    tensors = {
        "a": torch.randn(3),
        "b.weight": torch.randn(5, 7).half(),
        "scalar": torch.tensor(2.0),
        "ids": torch.arange(5),
        "bf": torch.randn(2).bfloat16(),
    }
    path = tmp_path / "x.safetensors"
    cv.save_aligned_safetensors(tensors, path, metadata={"k": "v"})
    with safe_open(str(path), framework="pt") as f:  # the plain safetensors reader accepts the file
        assert f.metadata() == {"k": "v"}
        assert set(tensors) <= set(f.keys())
    loaded = cv.load_aligned_safetensors(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert all(v.data_ptr() % cv.ALIGN == 0 for v in loaded.values())


def test_unsupported_description_names_the_file(reference_dir, tokenizer_dir, tmp_path):
    raw = json.loads((reference_dir / "model_v.json").read_text())
    raw["cldm"]["params"]["unet_cfg"]["resblock_updown"] = True
    raw["tokenizer"] = str(tokenizer_dir)
    for key in ("sd_checkpoint", "controlnet_checkpoint"):
        raw["cldm"][key] = str(reference_dir / raw["cldm"][key])
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SetupError, match=r"custom\.json: unet_cfg\.resblock_updown=True is not supported"):
        stage2.load_stage2(load_model_description(path), use_cache=False)
