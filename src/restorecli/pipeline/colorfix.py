"""Colour correction of the diffusion output toward the stage-1 image.

`wavelet` is the official, always-on fix of v2/v2.1 (DiffBIR utils/common.py wavelet_reconstruction,
PIPELINE.md 9.2); `adain` is the v1-era alternative (7bd5675 utils/image/align_color.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise [1,2,1]x[1,2,1]/16 blur with dilation `radius` over a replicate-padded image."""
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, k, groups=x.shape[1], dilation=radius)


def wavelet_decompose(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): `levels` dilated blurs (radius 2^i); high is the sum of what each blur removed."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """High frequencies of `content` + low frequencies of `style` (same size, NCHW)."""
    content_high, _ = wavelet_decompose(content)
    _, style_low = wavelet_decompose(style)
    return content_high + style_low


def adain_color_fix(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of `content` matched to `style` (unbiased variance + eps, as the v1 code)."""

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


def color_fix(kind: str, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    if kind == "wavelet":
        return wavelet_color_fix(content, style)
    if kind == "adain":
        return adain_color_fix(content, style)
    if kind == "none":
        return content
    raise ValueError(f"unknown colour fix {kind!r}")
