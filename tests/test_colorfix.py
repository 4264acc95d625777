"""Colour fix: golden wavelet reconstruction and properties of each method."""

import torch

from conftest import assert_close_rel, load_golden
from restorecli.pipeline.colorfix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decompose


def test_wavelet_matches_official(reference_dir):
    g, _ = load_golden(reference_dir, "colorfix")
    content = g["content_u8"].float() / 255
    style = g["style_u8"].float() / 255
    high, _ = wavelet_decompose(content)
    assert_close_rel(high, g["content_high"], what="content_high")
    assert_close_rel(wavelet_color_fix(content, style), g["out"], what="out")


def test_wavelet_parts_sum_to_the_image():
    x = torch.rand(1, 3, 33, 47, generator=torch.Generator().manual_seed(0))
    high, low = wavelet_decompose(x)
    assert torch.allclose(high + low, x, atol=1e-6)


def test_wavelet_takes_style_colour_and_content_detail():
    gen = torch.Generator().manual_seed(1)
    content = torch.rand(1, 3, 64, 64, generator=gen)
    flat_style = torch.full((1, 3, 64, 64), 0.25)
    out = wavelet_color_fix(content, flat_style)
    # the mean colour comes from the style; the detail (content - its blur) is kept
    assert abs(out.mean().item() - 0.25) < 0.02
    assert torch.allclose(out - 0.25, wavelet_decompose(content)[0], atol=1e-5)


def test_adain_matches_style_statistics():
    gen = torch.Generator().manual_seed(2)
    content = torch.rand(1, 3, 40, 40, generator=gen)
    style = torch.rand(1, 3, 40, 40, generator=gen) * 0.3 + 0.6
    out = adain_color_fix(content, style)
    assert torch.allclose(out.mean((2, 3)), style.mean((2, 3)), atol=1e-5)
    assert torch.allclose(out.std((2, 3)), style.std((2, 3)), atol=1e-3)


def test_none_is_identity():
    x = torch.rand(1, 3, 8, 8)
    assert color_fix("none", x, torch.zeros_like(x)) is x
