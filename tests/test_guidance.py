"""Restoration guidance (restorecli.diffusion.guidance): golden parity with the v2-era official code,
the defined fixes (w_mse in latent space, every sampler family, tiled sampling), properties on the tiny
models, the pipeline / CLI wiring (`--guidance*`, `--save-guidance-map`) and its usage errors.

Golden data: ../shared/reference/golden/guidance.safetensors (official 70c0944, eps model, spaced sampler).
The guided CLI cases of cases.json run in tests/test_cases.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_rel, load_golden
from restorecli.diffusion.conditioning import ControlCondition, ControlledModel
from restorecli.diffusion.guidance import (
    GuidanceSettings,
    RestorationGuidance,
    guidance_gradient,
    guidance_loss,
    latent_weight_map,
    weight_map,
)
from restorecli.diffusion.hooks import X0HookContext
from restorecli.diffusion.noise import GeneratorNoise
from restorecli.diffusion.sampling import sample
from restorecli.diffusion.schedules import NoiseSchedule
from restorecli.errors import UsageError

RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage2(reference_dir):
    from restorecli.models.description import load_model_description
    from restorecli.models.stage2 import load_stage2

    return {p: load_stage2(load_model_description(reference_dir / f"model_{p}.json"), use_cache=False) for p in ("eps", "v")}


@pytest.fixture(scope="module")
def golden(reference_dir):
    return load_golden(reference_dir, "guidance")


def _guide(models, target, noise=None, **settings) -> RestorationGuidance:
    return RestorationGuidance(
        GuidanceSettings(**settings), target, vae=models.vae, latent_scale_factor=models.latent_scale_factor,
        noise=noise or GeneratorNoise.from_seed(0),
    )


# -- golden parity (PIPELINE.md 7.2) -------------------------------------------------------------


def test_weight_map_matches_official(golden):
    tensors, _ = golden
    target = tensors["target_rgb_u8"].float() / 255 * 2 - 1
    assert_close_rel(weight_map((target + 1) / 2), tensors["w_mse_weight"], RTOL, what="w_mse_weight")


@pytest.mark.parametrize("loss", ["mse", "w_mse"])
def test_rgb_loss_and_gradient_match_official(golden, stage2, loss):
    """loss, g_rgb = -dL/dpred * scale * 3000 and g_rgb back-propagated through the VAE decoder."""
    tensors, meta = golden
    scale = float(meta["scale"])
    target = tensors["target_rgb_u8"].float() / 255 * 2 - 1
    guide = _guide(stage2["eps"], target, scale=scale, loss=loss, space="rgb")
    leaf = tensors["pred_x0_latent"].clone().requires_grad_(True)
    with torch.enable_grad():
        pred = guide.decode_with_grad(leaf)
        g_rgb, value = guidance_gradient(pred, target, guide.loss_weight("rgb"), scale)
        (g_latent,) = torch.autograd.grad(pred, leaf, g_rgb)
    assert_close_rel(torch.tensor([value]), tensors[f"rgb/{loss}/loss"], RTOL, what=f"rgb/{loss}/loss")
    assert_close_rel(g_rgb, tensors[f"rgb/{loss}/g_rgb"], RTOL, what=f"rgb/{loss}/g_rgb")
    assert_close_rel(g_latent, tensors[f"rgb/{loss}/g_latent"], RTOL, what=f"rgb/{loss}/g_latent")


def test_checkpointed_decoder_gives_the_same_guidance(golden, stage2):
    """Gradient checkpointing (used with tiled sampling to bound memory) recomputes, it does not change."""
    tensors, _ = golden
    target = tensors["target_rgb_u8"].float() / 255 * 2 - 1
    x0 = tensors["pred_x0_latent"]
    plain = _guide(stage2["eps"], target, scale=0.1, loss="w_mse", space="rgb").step(x0, 0.5)
    checkpointed = _guide(stage2["eps"], target, scale=0.1, loss="w_mse", space="rgb")
    checkpointed.checkpoint = True
    assert torch.equal(checkpointed.step(x0, 0.5), plain)
    assert not stage2["eps"].vae.is_gradient_checkpointing


def test_latent_target_loss_and_gradient_match_official(golden, stage2):
    """The target latent is a posterior SAMPLE (one draw of the generator), not the mode."""
    tensors, meta = golden
    scale = float(meta["scale"])
    target = tensors["target_rgb_u8"].float() / 255 * 2 - 1
    noise = GeneratorNoise.from_seed(20240621)
    guide = _guide(stage2["eps"], target, noise, scale=scale, loss="mse", space="latent")
    latent = guide.latent_target()
    assert noise.draws == 1
    assert torch.equal(torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(20240621)), tensors["latent/target_noise"])
    assert_close_rel(latent, tensors["latent/target_latent"], RTOL, what="latent/target_latent")
    g, value = guidance_gradient(tensors["pred_x0_latent"], latent, None, scale)
    assert_close_rel(torch.tensor([value]), tensors["latent/mse/loss"], RTOL, what="latent/mse/loss")
    assert_close_rel(g, tensors["latent/mse/g"], RTOL, what="latent/mse/g")


@pytest.mark.parametrize("run", ["run0", "run1", "run2", "run3"])
def test_guided_spaced_runs_match_official(golden, stage2, run):
    """Full 4-step runs of the v2 SpacedSampler (cfg 4): w_mse/rgb, mse/latent (one posterior draw per
    repeat before the step's own draw), w_mse/rgb with a t window and 2 repeats, and no guidance.
    Every draw of the run is exactly the recorded one (the run's labels list them in order)."""
    from restorecli.models.cldm import encode_prompt, vae_encode

    tensors, meta = golden
    spec = json.loads(meta["runs"])[run]
    models = stage2["eps"]
    target = tensors["run/cond_img_u8"].float() / 255 * 2 - 1
    c_img = vae_encode(models, target)
    c_txt, c_neg = encode_prompt(models, [meta["prompt"]]), encode_prompt(models, [meta["neg_prompt"]])
    noise = GeneratorNoise.from_seed(spec["seed"])
    x_T = noise.randn((1, 4, 8, 12))
    assert torch.equal(x_T, tensors[f"{run}/x_T"])
    hook = None
    if spec["loss"]:
        hook = _guide(models, target, noise, scale=spec["scale"], loss=spec["loss"], space=spec["space"],
                      start=spec["start"], stop=spec["stop"], repeat=spec["repeat"])
    z = sample("spaced", ControlledModel(models.controlled_unet()), x_T, schedule=NoiseSchedule.from_spec(models.diffusion),
               steps=4, cfg=float(meta["cfg"]), noise=noise, cond=ControlCondition(c_txt, c_img),
               uncond=ControlCondition(c_neg, c_img), x0_hook=hook)
    assert noise.draws == len(spec["labels"])
    assert_close_rel(z, tensors[f"{run}/z"], RTOL, what=f"{run}/z")
    if hook is not None:  # t_now = 1000, 667, 334, 1: the window (200, 800) keeps two steps
        assert hook.applied == (2 * spec["repeat"] if spec["start"] == 800 else 4 * spec["repeat"])


# -- the defined fixes -----------------------------------------------------------------------------


def test_latent_weight_map_is_the_mean_of_each_8x8_cell():
    w = torch.rand(1, 1, 32, 48)
    pooled = latent_weight_map(w)
    assert pooled.shape == (1, 1, 4, 6)
    assert torch.allclose(pooled[0, 0, 1, 2], w[0, 0, 8:16, 16:24].mean())
    with pytest.raises(ValueError, match="multiple of 8"):
        latent_weight_map(torch.rand(1, 1, 12, 16))


def test_w_mse_in_latent_space_is_defined_and_region_adaptive(stage2):
    """Upstream crashes here (3-channel grey kernel, 4-channel latent). Ours: on a flat image w_mse IS
    mse; on a half-flat / half-textured image the same latent error is pulled harder in the flat half."""
    models = stage2["eps"]
    flat = torch.full((1, 3, 64, 64), 0.2)
    g_w = _guide(models, flat, scale=1.0, loss="w_mse", space="latent")
    assert torch.equal(g_w.loss_weight("latent"), torch.ones(1, 1, 8, 8))
    x0, tgt = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(guidance_gradient(x0, tgt, g_w.loss_weight("latent"), 1.0)[0],
                       guidance_gradient(x0, tgt, None, 1.0)[0])

    rng = torch.Generator().manual_seed(0)
    half = torch.full((1, 3, 64, 64), 0.0)
    half[..., :, 32:] = torch.rand((1, 3, 64, 32), generator=rng) * 2 - 1  # texture on the right
    weights = _guide(models, half, scale=1.0, loss="w_mse", space="latent").loss_weight("latent")
    g, _ = guidance_gradient(torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8), weights, 1.0)
    assert g[..., :3].abs().mean() > 5 * g[..., 5:].abs().mean()  # away from the seam column
    assert weights.min() >= 0 and weights.max() <= 1


def test_guidance_loss_sums_over_the_batch():
    pred, tgt = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    assert torch.allclose(guidance_loss(pred, tgt), guidance_loss(pred[:1], tgt[:1]) + guidance_loss(pred[1:], tgt[1:]))


def _ctx(model_t=500.0, substep=0, step=0, coefficient=0.5, family="edm"):
    return X0HookContext(family, step, 4, substep, 0, model_t, 0.5, coefficient, torch.zeros(1, 4, 8, 8))


def test_hook_window_repeats_and_substeps(stage2):
    """Active while stop < t + 1 < start (strict); `repeat` iterations; a step's later evaluations get
    the step's first shift (a constant denoiser shift, integrated exactly by every solver); nothing at a
    non-positive x0 weight; every latent iteration draws once."""
    models = stage2["eps"]
    target = torch.rand(1, 3, 64, 64) * 2 - 1
    noise = GeneratorNoise.from_seed(3)
    guide = _guide(models, target, noise, scale=0.5, loss="mse", space="latent", start=800, stop=200, repeat=3)
    x0 = torch.randn(1, 4, 8, 8)
    for t in (799.0, 199.0, 850.0):  # t_now = 800 and 200 are outside (strict), 851 too
        assert guide(x0, _ctx(t)) is x0
    assert noise.draws == 0
    out = guide(x0, _ctx(798.0, step=1))
    assert noise.draws == 3 and guide.applied == 3 and not torch.equal(out, x0)
    other = torch.randn(1, 4, 8, 8)
    assert torch.allclose(guide(other, _ctx(600.0, substep=1, step=1, coefficient=0.0)), other + (out - x0))
    assert noise.draws == 3
    assert guide(x0, _ctx(500.0, step=2, coefficient=0.0)) is x0
    assert guide(other, _ctx(400.0, substep=1, step=2)) is other  # no shift carried into a skipped step


def test_settings_are_checked():
    for bad in (dict(scale=-1.0), dict(scale=math.nan), dict(scale=math.inf), dict(loss="l1"), dict(space="pixel"),
                dict(start=200, stop=200), dict(start=100, stop=200), dict(repeat=0)):
        with pytest.raises(UsageError):
            GuidanceSettings(**bad)
    assert not GuidanceSettings().enabled and GuidanceSettings(scale=0.25).enabled


def test_tiled_sampling_guides_the_whole_latent(stage2):
    """The hook sees the blended x0 of the whole latent. With a per-pixel model (which tiling does not
    change) a guided tiled run therefore equals the guided untiled run: the loss, its mean over the
    whole image and the weight map are the whole image's, so tiles cannot disagree at their overlap."""
    models = stage2["eps"]
    target = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c_img = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    cond = ControlCondition(torch.zeros(1, 77, 32), c_img)
    schedule = NoiseSchedule.from_spec(models.diffusion)
    shapes = []

    def pointwise(x, t, c):
        return 0.5 * x + 0.1 * c.c_img

    def run(tile, space):
        noise = GeneratorNoise.from_seed(4)
        guide = _guide(models, target, noise, scale=0.5, loss="w_mse", space=space)

        def hook(x0, ctx):
            shapes.append(tuple(x0.shape))
            return guide(x0, ctx)

        return sample("ddim", pointwise, noise.randn(c_img.shape), schedule=schedule, steps=4, cfg=1.0, noise=noise,
                      cond=cond, tile=tile, x0_hook=hook)

    for space in ("latent", "rgb"):
        assert_close_rel(run((8, 4), space), run(None, space), 1e-5, what=f"tiled vs untiled, {space}")
    assert set(shapes) == {(1, 4, 16, 12)}


# -- properties on the tiny models ---------------------------------------------------------------

#: Guidance is the official loss, a MEAN over the latent (or pixel) elements, so a scale's pull per element
#: is inversely proportional to the image's size. These runs use a 128x128 image (16x16 latent) and
#: scales equivalent to the listed ones at 512x512 (the smallest stage-2 input: the 512 rule):
#: s * (16 * 16) / (64 * 64).
SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)
SIZE = 128
TILE = (12, 4)  # latent tile / stride: 2 x 2 tiles overlapping by 8 on the 16 x 16 latent


@pytest.fixture(scope="module")
def photo(reference_dir):
    img = Image.open(reference_dir / "inputs" / "mixed_96x70.png").convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def _distances(models, photo, sampler, tile, space):
    """[(MSE, region-weighted MSE)] of the guided result to the stage-1 image, for each scale: in rgb
    space the decoded sample vs the image, in latent space the sample vs the image's latent."""
    from restorecli.models.cldm import encode_prompt, vae_decode, vae_encode

    target = photo * 2 - 1
    c_img = vae_encode(models, target)
    cond = ControlCondition(encode_prompt(models, [""]), c_img)
    model = ControlledModel(models.controlled_unet())
    schedule = NoiseSchedule.from_spec(models.diffusion)
    weight = weight_map(photo) if space == "rgb" else latent_weight_map(weight_map(photo))
    rows = []
    for s in SCALES:
        noise = GeneratorNoise.from_seed(11)
        x_T = noise.randn(c_img.shape)
        hook = None
        if s:
            hook = _guide(models, target, noise, scale=s * c_img[0, 0].numel() / 64**2, loss="w_mse", space=space)
        z = sample(sampler, model, x_T, schedule=schedule, steps=4, cfg=1.0, noise=noise, cond=cond, tile=tile,
                   x0_hook=hook)
        err = ((vae_decode(models, z) + 1) / 2 - photo) ** 2 if space == "rgb" else (z - c_img) ** 2
        rows.append((float(err.mean()), float((err * weight).mean())))
    return rows


def _strictly_decreasing(values):
    return all(b < a for a, b in zip(values, values[1:]))


LATENT_CASES = [("eps", "spaced"), ("eps", "ddim"), ("v", "dpm++_m2"), ("v", "edm_dpm++_3m_sde")]
RGB_CASES = [("eps", "spaced"), ("eps", "ddim"), ("eps", "dpm++_m2")]


@pytest.mark.parametrize("tile", [None, TILE], ids=["untiled", "tiled"])
@pytest.mark.parametrize("par, sampler", LATENT_CASES)
def test_latent_guidance_pulls_toward_the_stage1_latent(stage2, photo, par, sampler, tile):
    """Default settings (w_mse, latent): both distances fall strictly as the scale grows 0 -> 2, for an
    SDE and an ODE sampler of each parameterization, covering the four families.

    Measured in the latent space the guidance acts in: the tiny VAE has random weights, so the decoded
    latent of the image is as far from the image as an unguided sample (rgb MSE ~0.13 both); a trained
    VAE makes the two distances agree."""
    rows = _distances(stage2[par], photo, sampler, tile, "latent")
    assert _strictly_decreasing([r[0] for r in rows]), rows
    assert _strictly_decreasing([r[1] for r in rows]), rows


@pytest.mark.parametrize("tile", [None, TILE], ids=["untiled", "tiled"])
@pytest.mark.parametrize("par, sampler", RGB_CASES)
def test_rgb_guidance_pulls_toward_the_stage1_image(stage2, photo, par, sampler, tile):
    """rgb space: the decoded result's MSE and region-weighted MSE to the image fall strictly with the
    scale (eps model: spaced SDE, DDIM and DPM-Solver++ ODEs)."""
    rows = _distances(stage2[par], photo, sampler, tile, "rgb")
    assert _strictly_decreasing([r[0] for r in rows]), rows
    assert _strictly_decreasing([r[1] for r in rows]), rows


@pytest.mark.parametrize("sampler, tile", [("dpm++_m2", None), ("edm_dpm++_3m_sde", TILE)], ids=["dpm-untiled", "sde-tiled"])
def test_rgb_guidance_on_the_v_model_is_closer_than_none(stage2, photo, sampler, tile):
    """v model, rgb space: every guided result is closer to the image than the unguided one. (Not
    monotone in the scale: the random tiny decoder's loss is far from convex, and from scale ~0.5 a
    guidance step lands the latent where the decoded image is farther; see the report.)"""
    rows = _distances(stage2["v"], photo, sampler, tile, "rgb")
    assert all(r[0] < rows[0][0] and r[1] < rows[0][1] for r in rows[1:]), rows


# -- pipeline and CLI ---------------------------------------------------------------------------


CLI_BASE = ["--model", "model_eps.json", "--task", "sr", "--upscale", "1", "--sampler", "ddim", "--steps", "1",
            "--cfg", "1", "--prompt", "", "--captioner", "none", "--device", "cpu", "--precision", "fp32"]


@pytest.mark.slow
def test_guidance_zero_is_byte_identical_and_the_map_is_written(reference_dir, tmp_path, monkeypatch, capsys):
    """`--guidance 0` = no flag, byte for byte (no draw, no hook); `--save-guidance-map` writes the region
    weight map (gray, the output's size, white in flat regions)."""
    from restorecli.cli.app import main

    monkeypatch.chdir(reference_dir)
    plain, zero, gmap = tmp_path / "plain.png", tmp_path / "zero.png", tmp_path / "map.png"
    assert main(["inputs/blur_45x45.png", "-o", str(plain), *CLI_BASE]) == 0, capsys.readouterr().err
    assert main(["inputs/blur_45x45.png", "-o", str(zero), *CLI_BASE, "--guidance", "0",
                 "--save-guidance-map", str(gmap)]) == 0, capsys.readouterr().err
    assert plain.read_bytes() == zero.read_bytes()
    assert Image.open(gmap).mode == "L"
    m = np.asarray(Image.open(gmap))
    assert m.shape == (45, 45)
    assert 0 < m.mean() < 255 and m.std() > 0
    # an existing map is kept (the file fails, exit 1) unless --overwrite
    code = main(["inputs/blur_45x45.png", "-o", str(tmp_path / "again.png"), *CLI_BASE, "--save-guidance-map", str(gmap)])
    assert code == 1 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--guidance", "-0.5"], "`--guidance` must be >= 0"),
    (["--guidance-start", "200", "--guidance-stop", "200"], "`--guidance-start` must be greater"),
    (["--guidance-start", "100", "--guidance-stop", "800"], "`--guidance-start` must be greater"),
    (["--guidance-space", "pixel"], "'pixel' is not one of 'latent', 'rgb'"),
    (["--guidance-loss", "l1"], "'l1' is not one of 'w_mse', 'mse'"),
    (["--guidance-repeat", "0"], "`--guidance-repeat` must be >= 1"),
    (["--guidance", "nan"], "`--guidance` must be a finite number"),
    (["--save-guidance-map", "map.png", "--stage1-only"], "--save-guidance-map needs stage 2"),
    (["--save-guidance-map", "map.unknown"], "cannot tell the image format"),
])
def test_guidance_usage_errors_exit_2(reference_dir, tmp_path, monkeypatch, capsys, args, fragment):
    from restorecli.cli.app import main

    monkeypatch.chdir(reference_dir)
    code = main(["inputs/blur_45x45.png", "-o", str(tmp_path / "out.png"), *CLI_BASE, *args])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert fragment in captured.err and captured.out == ""
    assert not (tmp_path / "out.png").exists()


def test_guidance_map_file_needs_one_input(reference_dir, tmp_path, monkeypatch, capsys):
    from restorecli.cli.app import main

    monkeypatch.chdir(reference_dir)
    code = main(["inputs/blur_45x45.png", "inputs/sign_37x53.png", "-o", f"{tmp_path}/", *CLI_BASE,
                 "--save-guidance-map", str(tmp_path / "map.png")])
    assert code == 2 and "use --save-guidance-map DIR/" in capsys.readouterr().err
