"""Colour correction of the diffusion output toward the stage-1 image.

`wavelet` is the official, always-on fix of v2/v2.1 (DiffBIR utils/common.py wavelet_reconstruction);
`adain` is the v1-era alternative (7bd5675 utils/image/align_color.py). `color_fix_in_bands` computes the
same fix a band of rows at a time, in place, for images whose whole-image temporaries would not fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory import trim_freed_memory

WAVELET_LEVELS = 5
#: Rows of context a band of the wavelet fix needs on each side: the blurs' radii, 1 + 2 + ... + 2^(L-1).
WAVELET_HALO = 2**WAVELET_LEVELS - 1


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


def color_fix_in_bands(kind: str, decoded: torch.Tensor, style: torch.Tensor, rows: int) -> torch.Tensor:
    """``color_fix(kind, (decoded + 1) / 2, style)`` written into `decoded` itself (returned), `rows`
    rows at a time, so that only a band's temporaries exist instead of a score of image-sized ones.

    wavelet: each band is computed with WAVELET_HALO rows of context above and below; a wrong (replicate)
    padding at a band edge reaches 1 + 2 + ... + 16 = WAVELET_HALO rows deep after the five blurs, so
    the band's own rows are those of the whole-image fix, and at the image's edges the padding is the
    image's own. The rows above a band were overwritten by then: the original ones are carried over.
    adain: the per-channel mean and unbiased std of content and style over the whole image first
    (float64, two passes), then every band. none: ``(decoded + 1) / 2`` in place.
    """
    if rows < 1:
        raise ValueError(f"`rows` must be >= 1, got {rows}")
    if kind not in ("wavelet", "adain", "none"):
        raise ValueError(f"unknown colour fix {kind!r}")
    h = decoded.shape[-2]
    bands = [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]
    if kind == "none":
        for r0, r1 in bands:
            decoded[:, :, r0:r1].add_(1).div_(2)
        return decoded
    if kind == "adain":
        c_mean, c_std = _band_stats(decoded, bands, content=True)
        s_mean, s_std = _band_stats(style, bands, content=False)
        for r0, r1 in bands:
            band = decoded[:, :, r0:r1]
            band.copy_(((band + 1) / 2 - c_mean) / c_std * s_std + s_mean)
        return decoded
    halo = WAVELET_HALO
    carry = decoded[:, :, :0].clone()  # the original rows just above the band, at most `halo`
    for r0, r1 in bands:
        e0, e1 = max(0, r0 - halo), min(h, r1 + halo)
        above = carry[:, :, carry.shape[2] - (r0 - e0):]
        original = torch.cat([above, decoded[:, :, r0:e1]], dim=2)
        out = wavelet_color_fix((original + 1) / 2, style[:, :, e0:e1].to(decoded.device, decoded.dtype))
        carry = torch.cat([carry, original[:, :, r0 - e0 : r1 - e0]], dim=2)[:, :, -halo:].clone()
        del original
        decoded[:, :, r0:r1].copy_(out[:, :, r0 - e0 : r1 - e0])
        del out
        trim_freed_memory()  # a band's temporaries, below glibc's mmap threshold, would otherwise pile up
    return decoded


def _band_stats(x: torch.Tensor, bands, *, content: bool, eps: float = 1e-5):
    """Per-channel mean and sqrt(unbiased var + eps) of x (content: of (x + 1) / 2) over all bands,
    in float64, as float32-ready (B, C, 1, 1) tensors in x's dtype."""
    def part(r0, r1):
        band = x[:, :, r0:r1].double()
        return (band + 1) / 2 if content else band

    b, c = x.shape[:2]
    n = x.shape[-2] * x.shape[-1]
    total = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    for r0, r1 in bands:
        total += part(r0, r1).sum((2, 3))
    mean = total / n
    m2 = torch.zeros_like(total)
    for r0, r1 in bands:
        m2 += (part(r0, r1) - mean[:, :, None, None]).square().sum((2, 3))
    std = (m2 / max(n - 1, 1) + eps).sqrt()
    return mean.to(x.dtype)[:, :, None, None], std.to(x.dtype)[:, :, None, None]
