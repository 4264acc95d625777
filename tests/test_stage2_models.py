"""Stage-2 models against the golden outputs of the official code (text, VAE, ControlNet, denoiser)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import assert_close_rel, load_golden
from restorecli.models import cldm
from restorecli.models.controlnet import IRControlNetModel
from restorecli.models.description import load_model_description
from restorecli.models.stage2 import load_stage2


def _description(reference_dir, name="model_v.json", *, safetensors=False):
    desc = load_model_description(reference_dir / name)
    if safetensors:
        spec = dataclasses.replace(
            desc.cldm,
            sd_checkpoint=reference_dir / "sd.safetensors",
            controlnet_checkpoint=reference_dir / "controlnet.safetensors",
        )
        desc = dataclasses.replace(desc, cldm=spec)
    return desc


@pytest.fixture(scope="module", params=["ckpt+pth", "safetensors"])
def models(request, reference_dir, tokenizer_dir):
    desc = _description(reference_dir, safetensors=request.param == "safetensors")
    return load_stage2(desc, use_cache=False)


def test_description_fields(reference_dir, tokenizer_dir):
    v = load_stage2(_description(reference_dir, "model_v.json"), use_cache=False)
    eps = load_stage2(_description(reference_dir, "model_eps.json"), use_cache=False)
    assert (v.parameterization, v.zero_snr) == ("v", True)
    assert (eps.parameterization, eps.zero_snr) == ("eps", False)
    assert v.latent_scale_factor == pytest.approx(0.18215)
    assert v.dtype == torch.float32 and v.device.type == "cpu"
    assert not any(p.requires_grad for p in v.unet.parameters())


def test_tokenizer_ids_match_openclip(models, reference_dir):
    golden, meta = load_golden(reference_dir, "text")
    ids = cldm.tokenize(models, json.loads(meta["prompts"]))
    assert torch.equal(ids, golden["tokens"])


def test_long_prompt_is_cut_with_eot_last(models):
    ids = cldm.tokenize(models, ["photo " * 200, ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert ids[1, :2].tolist() == [49406, 49407] and not ids[1, 2:].any()  # zero padding


def test_text_embedding(models, reference_dir):
    golden, meta = load_golden(reference_dir, "text")
    c_txt = cldm.encode_prompt(models, json.loads(meta["prompts"]))
    assert_close_rel(c_txt, golden["c_txt"], what="c_txt")


def test_vae_encode_decode(models, reference_dir):
    golden, _ = load_golden(reference_dir, "vae")
    x = golden["vae_in_u8"].float() / 255 * 2 - 1
    with torch.no_grad():
        posterior = models.vae.encode(x).latent_dist
    assert_close_rel(posterior.mean, golden["posterior_mean"], what="posterior mean")
    assert_close_rel(posterior.logvar, golden["posterior_logvar"], what="posterior logvar")
    assert_close_rel(cldm.vae_encode(models, x), golden["latent"], what="latent")
    assert_close_rel(cldm.vae_decode(models, golden["latent"]), golden["decoded"], what="decoded")


def test_condition_latent(models, reference_dir):
    golden, _ = load_golden(reference_dir, "denoiser")
    cond = golden["cond_img_u8"].float() / 255
    assert_close_rel(cldm.vae_encode(models, cond * 2 - 1), golden["c_img"], what="c_img")


def test_controlnet_residuals(models, reference_dir):
    g, _ = load_golden(reference_dir, "denoiser")
    with torch.no_grad():
        down, mid = models.controlnet(g["x_t"], g["t"], g["c_txt"], g["c_img"])
    residuals = [*down, mid]
    assert len(residuals) == 5  # tiny model: 4 input blocks + middle
    for i, r in enumerate(residuals):
        assert_close_rel(r, g[f"control_{i:02d}"], what=f"control_{i:02d}")


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_denoiser_output(models, reference_dir, strength):
    g, _ = load_golden(reference_dir, "denoiser")
    out = models.controlled_unet()(g["x_t"], g["t"], g["c_txt"], g["c_img"], control_scale=strength)
    assert_close_rel(out, g[f"out_strength_{strength}"], what=f"out at strength {strength}")


@pytest.mark.parametrize("t", ["long", "float", "int", "float_scalar_tensor"])
def test_denoiser_takes_long_and_float_timesteps(models, reference_dir, t):
    g, _ = load_golden(reference_dir, "denoiser")
    value = {"long": g["t"], "float": g["t"].double(), "int": int(g["t"]), "float_scalar_tensor": g["t"][0].float()}[t]
    out = models.controlled_unet()(g["x_t"], value, g["c_txt"], g["c_img"])
    assert_close_rel(out, g["out_strength_1.0"], what=f"t as {t}")


def test_denoiser_batched_cond_uncond(models, reference_dir):
    """Samplers may batch [cond; uncond] with one c_img: same as two separate calls."""
    g, _ = load_golden(reference_dir, "denoiser")
    unet = models.controlled_unet()
    x2 = torch.cat([g["x_t"], g["x_t"] * 0.5])
    both = unet(x2, torch.tensor([517, 300]), torch.cat([g["c_txt"], g["c_txt_neg"]]), g["c_img"], 0.7)
    one = unet(g["x_t"], g["t"], g["c_txt"], g["c_img"], 0.7)
    two = unet(g["x_t"] * 0.5, torch.tensor([300]), g["c_txt_neg"], g["c_img"], 0.7)
    assert both.shape == (2, 4, 8, 12)
    assert_close_rel(both[:1], one, rtol=1e-5, what="batch item 0")
    assert_close_rel(both[1:], two, rtol=1e-5, what="batch item 1")


def test_controlnet_save_pretrained_round_trip(models, reference_dir, tmp_path):
    g, _ = load_golden(reference_dir, "denoiser")
    models.controlnet.save_pretrained(tmp_path / "cn")
    again = IRControlNetModel.from_pretrained(tmp_path / "cn").eval()
    def plain(cfg):
        return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))

    assert plain(again.config) == plain(models.controlnet.config)
    ours, theirs = models.controlnet.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def run(net):
        with torch.no_grad():
            down, mid = net(g["x_t"], g["t"], g["c_txt"], g["c_img"])
        return [*down, mid]

    # from_pretrained leaves the weights memory-mapped at unaligned offsets, where CPU kernels round
    # differently (last bits only); in fresh allocations, as load_stage2 places them, outputs are identical
    for x, y in zip(run(models.controlnet), run(again), strict=True):
        assert_close_rel(y, x, rtol=1e-6, what="from_pretrained output")
    again.load_state_dict({k: v.clone() for k, v in theirs.items()}, assign=True)
    for x, y in zip(run(models.controlnet), run(again), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 0.02), (torch.bfloat16, 0.1)])
def test_half_weights_load_and_run(reference_dir, tokenizer_dir, dtype, rtol):
    """fp16 and bf16 weights load and the denoiser runs in them (on the CPU), returning float32 close to
    the official float32 output (bf16 has 8 mantissa bits, fp16 11: hence the two bounds)."""
    m = load_stage2(_description(reference_dir), dtype=dtype, use_cache=False)
    g, _ = load_golden(reference_dir, "denoiser")
    out = m.controlled_unet()(g["x_t"], g["t"], g["c_txt"], g["c_img"])
    assert m.dtype == dtype and m.unet.conv_in.weight.dtype == dtype and out.dtype == torch.float32
    assert_close_rel(out, g["out_strength_1.0"], rtol=rtol, what=f"{dtype} denoiser")
