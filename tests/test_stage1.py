"""Stage-1 pipeline semantics: golden parity with the official code, the CLI case, sizes, tiling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_close_rel, load_golden
from restorecli import memory
from restorecli.stage1.memory import stage1_peak_bytes
from restorecli.stage1 import run as s1
from restorecli.errors import InputError, UsageError
from restorecli.stage1.cleaners import load_cleaner
from restorecli.windows import sliding_windows


@pytest.fixture(scope="module")
def golden(reference_dir):
    tensors, meta = load_golden(reference_dir, "stage1")
    return tensors, meta


@pytest.fixture(scope="module")
def swinir(reference_dir):
    return load_cleaner(reference_dir / "swinir.safetensors")


@pytest.fixture(scope="module")
def pipe_result(golden, swinir):
    """The untiled SwinIR pipeline on the golden 53x37 input at --upscale 2 (computed once)."""
    g, _ = golden
    return s1.run_stage1(g["pipe_lq_u8"][0].numpy(), swinir, upscale=2)


def _u8(x: torch.Tensor) -> torch.Tensor:
    """The official final conversion: *255, clamp, truncating cast; NCHW -> NHWC."""
    return (x * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _pool8(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 8, ceil_mode=True)


# -- golden parity (../shared/reference/golden/stage1.safetensors) ----------------------------------------


@pytest.mark.parametrize("checkpoint", ["swinir.pth", "swinir.safetensors"])
def test_swinir_forward_of_the_zero_padded_input(reference_dir, golden, checkpoint):
    g, _ = golden
    cleaner = load_cleaner(reference_dir / checkpoint)
    x = g["swinir_in_u8"].float() / 255
    assert_close_rel(cleaner.run(s1.pad_to_multiple(x, 64)), g["swinir_out_pad64"], what="swinir_out_pad64")


def test_pre_upscale_is_bit_exact_with_pil(golden):
    g, meta = golden
    up = s1.pre_upscale(g["pipe_lq_u8"][0].numpy(), float(meta.get("upscale", 2)))
    assert np.array_equal(up, g["pipe_lq_up_u8"][0].numpy())


def test_short_side_512_size(golden):
    g, _ = golden
    x = s1.image_to_tensor(g["pipe_lq_up_u8"][0].numpy())
    assert list(s1.resize_short_edge_to(x).shape[-2:]) == g["pipe_lq_short512_size"].tolist()


def test_untiled_pipeline_condition(golden, pipe_result):
    g, _ = golden
    cond = pipe_result.cond_img
    assert list(cond.shape[-2:]) == g["pipe_cond_img_size"].tolist()
    assert pipe_result.output_size == (74, 106) and pipe_result.tile is None
    assert_close_rel(cond[..., :64, :64], g["pipe_cond_img_crop_tl"], what="crop_tl")
    assert_close_rel(cond[..., -64:, -64:], g["pipe_cond_img_crop_br"], what="crop_br")
    assert_close_rel(_pool8(cond), g["pipe_cond_img_pool8"], what="pool8")
    assert cond.max() > 1.0  # nothing clamps the condition


def test_stage1_only_uint8(golden, pipe_result):
    g, _ = golden
    out = s1.stage1_only_output(pipe_result)
    assert tuple(out.shape[-2:]) == pipe_result.output_size
    diff = (_u8(out).int() - g["pipe_stage1_only_u8"].int()).abs()
    assert diff.max() <= 1


def test_tiled_raw_output(golden, swinir):
    g, meta = golden
    x = g["tiled_in_u8"].float() / 255
    size, stride = int(meta.get("tiled_tile_size", 64)), int(meta.get("tiled_tile_stride", 48))
    raw = s1.tiled_forward(swinir.run, x, size, stride)
    assert_close_rel(raw[..., 20:84, 37:117], g["tiled_raw_crop"], what="tiled_raw_crop")


def test_tiled_pipeline(golden, swinir):
    g, _ = golden
    result = s1.apply_cleaner(g["tiled_in_u8"].float() / 255, swinir, tile_size=64, tile_stride=48)
    cond = result.cond_img
    assert result.tile == (64, 48) and not result.auto_tiled
    assert list(cond.shape[-2:]) == g["tiled_cond_img_size"].tolist()
    assert_close_rel(cond[..., :64, :64], g["tiled_cond_img_crop_tl"], what="tiled crop_tl")
    assert_close_rel(cond[..., -64:, -64:], g["tiled_cond_img_crop_br"], what="tiled crop_br")
    assert_close_rel(_pool8(cond), g["tiled_cond_img_pool8"], what="tiled pool8")


# -- the CLI case, through the library ---------------------------------------------------------------------


def test_case_stage1_only_x2(reference_dir):
    case = next(c for c in json.loads((reference_dir / "cases.json").read_text())["cases"] if c["name"] == "stage1_only_x2")
    args = case["args"]
    assert "--stage1-only" in args
    from restorecli.models.description import load_model_description

    description = load_model_description(reference_dir / args[args.index("--model") + 1])
    cleaner = load_cleaner(description.cleaner)
    rgb = np.asarray(Image.open(reference_dir / case["input"]).convert("RGB"))
    result = s1.run_stage1(rgb, cleaner, upscale=float(args[args.index("--upscale") + 1]))
    got = _u8(s1.stage1_only_output(result))[0].numpy().astype(np.int32)
    want = np.asarray(Image.open(reference_dir / case["expected"]).convert("RGB")).astype(np.int32)
    tol = case["tolerance"]
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert (diff <= tol["max_diff"]).mean() >= tol["min_fraction"]
    mse = (diff.astype(np.float64) ** 2).mean()
    assert mse == 0 or 10 * math.log10(255**2 / mse) >= tol["min_psnr"]


# -- wiring ------------------------------------------------------------------------------------------------


def test_plans_follow_the_official_wiring():
    assert s1.stage1_plan("v1", "sr") == ("swinir_general", "swinir", True)
    assert s1.stage1_plan("v2", "sr") == ("bsrnet", "bsrnet", False)
    assert s1.stage1_plan("v2", "denoise") == ("scunet_psnr", "scunet", True)
    assert s1.stage1_plan("v2.1", "denoise") == ("swinir_realesrgan", "swinir", True)
    assert s1.stage1_plan("v2", "unaligned_face") == ("bsrnet", "bsrnet", False)
    for version in ("v1", "v2", "v2.1"):
        assert s1.stage1_plan(version, "face") == ("swinir_face", "swinir", True)
    assert s1.stage1_plan("custom", "face").pipeline == "swinir"
    with pytest.raises(UsageError, match="unaligned_face"):
        s1.stage1_plan("v1", "unaligned_face")


def test_plans_name_the_cleaners_of_weights_toml():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from restorecli.weights import DEFAULT_TOML

    versions = tomllib.loads(DEFAULT_TOML.read_text())["versions"]
    for version, tasks in versions.items():
        for task, wiring in tasks.items():
            if isinstance(wiring, dict) and "cleaner" in wiring:
                assert s1.stage1_plan(version, task).cleaner == wiring["cleaner"], (version, task)


# -- small models for property tests -----------------------------------------------------------------------


def _random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() else v) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_bsrnet():
    from spandrel.architectures.ESRGAN import ESRGAN

    return load_cleaner(_random_state_dict(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4), 3), name="bsrnet")


@pytest.fixture(scope="module")
def tiny_scunet():
    from spandrel.architectures.SCUNet import SCUNet

    return load_cleaner(_random_state_dict(SCUNet(config=[1] * 7, dim=64), 4), name="scunet")


@pytest.fixture(scope="module")
def tiny_x2():
    from spandrel.architectures.Compact import Compact

    return load_cleaner(_random_state_dict(Compact(num_feat=8, num_conv=2, upscale=2), 5), name="compact_x2")


def _image(h, w, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=(h, w, 3), endpoint=True).astype(dtype)


@pytest.mark.parametrize("h, w, upscale", [(37, 53, 1.0), (41, 30, 2.5), (130, 97, 4.0), (150, 171, 3.7), (33, 29, 0.5)])
def test_bsrnet_output_size(tiny_bsrnet, h, w, upscale):
    assert tiny_bsrnet.pipeline == "bsrnet"
    result = s1.run_stage1(_image(h, w), tiny_bsrnet, upscale=upscale)
    assert result.output_size == (int(h * upscale), int(w * upscale))
    cond_h, cond_w = result.cond_img.shape[-2:]
    if min(result.output_size) < 512:  # short side 512 of the x4 output, whatever --upscale is
        assert min(cond_h, cond_w) == 512
        assert max(cond_h, cond_w) == int(max(h, w) * 4 * 512 / (min(h, w) * 4))
    else:
        assert (cond_h, cond_w) == result.output_size
    assert tuple(s1.stage1_only_output(result).shape[-2:]) == result.output_size


@pytest.mark.parametrize("h, w, upscale", [(37, 53, 1.0), (23, 41, 1.5)])
def test_scunet_output_size_and_replicate_padding(tiny_scunet, h, w, upscale):
    assert tiny_scunet.pipeline == "scunet"
    rgb = _image(h, w, seed=1)
    result = s1.run_stage1(rgb, tiny_scunet, upscale=upscale)
    assert result.output_size == (int(h * upscale), int(w * upscale))
    assert min(result.cond_img.shape[-2:]) == 512
    # the official SCUNet replicate-pads to 64 (spandrel's pads with reflect)
    x = s1.image_to_tensor(s1.pre_upscale(rgb, upscale))
    raw = tiny_scunet.run(F.pad(x, (0, (-x.shape[-1]) % 64, 0, (-x.shape[-2]) % 64), mode="replicate"))
    want = s1.resize_short_edge_to(raw[..., : x.shape[-2], : x.shape[-1]])
    torch.testing.assert_close(result.cond_img, want)


@pytest.mark.parametrize("h, w, upscale", [(37, 53, 1.0), (37, 53, 2.0), (41, 30, 3.0), (300, 257, 4.0), (31, 47, 7.5)])
def test_generic_x2_model_holds_the_requested_upscale(tiny_x2, h, w, upscale):
    assert (tiny_x2.pipeline, tiny_x2.scale) == ("generic", 2)
    result = s1.run_stage1(_image(h, w, seed=2), tiny_x2, upscale=upscale)
    assert result.output_size == (int(h * upscale), int(w * upscale))
    cond = result.cond_img
    if min(result.output_size) >= 512:
        assert tuple(cond.shape[-2:]) == result.output_size
    else:
        assert min(cond.shape[-2:]) == 512
    assert tuple(s1.stage1_only_output(result).shape[-2:]) == result.output_size


def test_too_small_for_the_upscale_is_an_input_error(tiny_x2):
    with pytest.raises(InputError, match="too small"):
        s1.run_stage1(_image(1, 3), tiny_x2, upscale=0.5, source="tiny.png")


def test_condition_size_is_the_512_rule():
    assert s1.condition_size((1200, 4)) == (153600, 512)  # 512 / 4 = 128x stretch
    assert s1.condition_size((53, 37)) == (733, 512)  # int(53 * 512 / 37)
    assert s1.condition_size((300, 300)) == (512, 512)
    assert s1.condition_size((600, 20000)) == (600, 20000)  # short side already >= 512: untouched


def test_a_thin_strip_is_refused_before_any_work(tiny_x2, monkeypatch):
    # x4 of a 1x300 strip is 4x1200; the 512 rule would make it 512x153600 (78.6 MP) of diffusion
    monkeypatch.setattr(tiny_x2, "run", lambda *a, **k: pytest.fail("the cleaner ran"))
    with pytest.raises(InputError, match=r"strip\.png: too thin.*4x1200 output to 512x153600") as err:
        s1.run_stage1(_image(300, 1), tiny_x2, upscale=4.0, source="strip.png")
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    # the limit is on the stretched side: 16384 / 512 = 32:1 is the widest thin image accepted
    ok = s1.run_stage1(_image(4, 128), tiny_x2, upscale=1.0)
    assert tuple(ok.cond_img.shape[-2:]) == (512, 16384)
    with pytest.raises(InputError, match="too thin"):
        s1.run_stage1(_image(4, 129), tiny_x2, upscale=1.0)


def test_explicit_tiles_fall_back_when_the_image_is_smaller(swinir):
    x = torch.rand(1, 3, 40, 100)
    assert s1._explicit_tile("swinir", x, 64, 32) is None
    with pytest.raises(UsageError, match="multiple of 64"):
        s1._explicit_tile("swinir", torch.rand(1, 3, 200, 200), 96, 48)
    with pytest.raises(UsageError, match="needs"):
        s1._explicit_tile("swinir", x, None, 32)
    assert s1._explicit_tile("bsrnet", torch.rand(1, 3, 200, 200), 96, None) == (96, 48)


# -- 16-bit input ------------------------------------------------------------------------------------------


def test_pre_upscale_keeps_16_bits():
    rgb8 = _image(23, 31, seed=7)
    rgb16 = rgb8.astype(np.uint16) * 257
    up8 = s1.pre_upscale(rgb8, 2.5).astype(np.int32)
    up16 = s1.pre_upscale(rgb16, 2.5)
    assert up16.dtype == np.uint16 and up16.shape == up8.shape
    diff = np.abs(up16 / 257 - up8)  # same filter and clipping as the 8-bit path, which rounds in between
    assert diff.max() <= 1.5 and diff.mean() < 0.5
    gradient = np.repeat(np.linspace(1000, 1300, 40, dtype=np.uint16)[None, :, None], 10, 0).repeat(3, 2)
    assert len(np.unique(s1.pre_upscale(gradient, 2)[..., 0])) > 40  # 8-bit steps (257) would give 2 values


# -- automatic tiling --------------------------------------------------------------------------------------


def test_available_memory():
    found = memory.available_memory("cpu")
    assert found > 0
    assert memory.available_memory("cpu", cap_bytes=1234) == min(found, 1234)


def test_peak_estimate_scales_with_pixels_and_precision():
    one = stage1_peak_bytes("swinir", 512, 512)
    assert stage1_peak_bytes("swinir", 1024, 1024) == 4 * one
    assert stage1_peak_bytes("swinir", 512, 512, dtype=torch.bfloat16) < one
    assert stage1_peak_bytes("swinir", 2048, 2048, tile=512) < stage1_peak_bytes("swinir", 2048, 2048)
    assert stage1_peak_bytes("generic", 100, 100, scale=4) > stage1_peak_bytes("generic", 100, 100)


def _seam_mask(h, w, tile, stride, width=2):
    """Rows/columns within `width` of an inner tile edge."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    for top, bottom, left, right in sliding_windows(h, w, tile, stride):
        for r in (top, bottom):
            if 0 < r < h:
                mask[max(r - width, 0) : r + width] = True
        for c in (left, right):
            if 0 < c < w:
                mask[:, max(c - width, 0) : c + width] = True
    return mask


def _assert_seam_free(tiled, untiled, tile, stride, max_err):
    err = (tiled - untiled).abs().mean(1)[0]
    mask = _seam_mask(*err.shape, tile, stride)
    assert err.max() <= max_err
    assert err[mask].mean() <= 1.5 * err[~mask].mean() + 1e-6, "error concentrates on tile borders"


def test_automatic_tiling_of_swinir_when_memory_is_short(swinir, golden, pipe_result):
    """The untiled pass of the golden input (512x733, padded 512x768) needs ~420 MB by the estimate;
    with 400 MB, 512 tiles (stride 256) over the same padded image are used, without seams."""
    g, _ = golden
    x = s1.image_to_tensor(g["pipe_lq_up_u8"][0].numpy())
    result = s1.apply_cleaner(x, swinir, max_memory=400 * 2**20)
    assert result.auto_tiled and result.tile == (512, 256)
    assert result.cond_img.shape == pipe_result.cond_img.shape
    _assert_seam_free(result.cond_img, pipe_result.cond_img, 512, 256, max_err=2e-3)
    assert s1.apply_cleaner(x[..., :64, :64], swinir, max_memory=10**12).tile is None  # fits: official path


def test_automatic_tiling_of_an_upscaler_is_seam_free(tiny_x2):
    x = s1.image_to_tensor(_image(256, 320, seed=3)).mul(0.5).add(0.25)
    untiled = s1.apply_cleaner(x, tiny_x2, output_size=(512, 640))
    budget = stage1_peak_bytes("generic", 256, 320, scale=2, tile=128) / memory.SAFETY + 1
    tiled = s1.apply_cleaner(x, tiny_x2, output_size=(512, 640), max_memory=int(budget))
    assert tiled.auto_tiled and tiled.tile == (128, 64)
    # a 5-layer conv net sees 5 pixels around; the gaussian weights are ~1e-5 at 32 px from a tile edge
    _assert_seam_free(tiled.cond_img, untiled.cond_img, 256, 128, max_err=1e-4)


def test_automatic_tiling_of_bsrnet_matches_untiled(tiny_bsrnet):
    x = s1.image_to_tensor(_image(128, 192, seed=4))
    untiled = s1.apply_cleaner(x, tiny_bsrnet, output_size=(256, 384))
    budget = stage1_peak_bytes("bsrnet", 128, 192, scale=4, tile=128) / memory.SAFETY + 1
    tiled = s1.apply_cleaner(x, tiny_bsrnet, output_size=(256, 384), max_memory=int(budget))
    assert tiled.auto_tiled and tiled.tile == (128, 64)
    torch.testing.assert_close(tiled.cond_img, untiled.cond_img, rtol=0, atol=1e-4)
