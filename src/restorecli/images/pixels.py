"""Pixel conversions between the files' integers and the pipeline's floats, and small helpers.

`to_float` / `from_float`: uint8 or uint16 <-> float32 in [0, 1]; the 8-bit direction is the
official truncation (DiffBIR diffbir/pipeline.py, Pipeline.run). `to_gray` makes the output of a
gray source gray again, `resize_alpha` carries alpha through a resize, and `to_8bit` rounds 16-bit
pixels for formats that hold 8 bits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 / 255 or uint16 / 65535 as float32 in [0, 1] (uint8 as the official `tensor / 255`)."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535
    raise ValueError(f"`pixels` must be uint8 or uint16, got {pixels.dtype}")


def from_float(x: np.ndarray, bit_depth: int) -> np.ndarray:
    """Floats in [0, 1] to integers, computed in x's own float dtype.

    8-bit: the official TRUNCATION, ``(x*255).clamp(0,255).to(uint8)`` (DiffBIR
    diffbir/pipeline.py, Pipeline.run): scaled, clipped, cast toward zero; NaN gives 0.
    16-bit: ``round(x*65535)`` clipped to 0..65535.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    # One float temporary, clipped in place by fmax/fmin, which also send NaN to 0 (no image-sized masks
    # or copies: large images), as clip followed by nan_to_num(nan=0) would.
    if bit_depth == 8:
        y = x * 255
        np.fmin(np.fmax(y, 0, out=y), 255, out=y)
        return y.astype(np.uint8)
    if bit_depth == 16:
        x = x.astype(np.float32) if x.dtype.itemsize < 4 else x  # float16 cannot hold 65535
        y = x * 65535
        np.rint(y, out=y)
        np.fmin(np.fmax(y, 0, out=y), 65535, out=y)
        return y.astype(np.uint16)
    raise ValueError(f"`bit_depth` must be 8 or 16, got {bit_depth}")


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxW luminance with ITU-R 601 weights (as Pillow's convert("L")), same dtype, rounded."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
    top = np.iinfo(rgb.dtype).max
    return np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, top).astype(rgb.dtype)


def resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxW alpha plane to `size` = (width, height) with PIL BICUBIC; dtype kept.

    uint8 goes through mode "L" like the colour pre-upscale; uint16 through mode "F", rounded back.
    """
    alpha = np.asarray(alpha)
    width, height = size
    if alpha.ndim != 2:
        raise ValueError(f"`alpha` must be HxW, got shape {alpha.shape}")
    if alpha.dtype == np.uint8:
        return np.asarray(Image.fromarray(alpha).resize((width, height), Image.Resampling.BICUBIC))
    if alpha.dtype == np.uint16:
        resized = Image.fromarray(alpha.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
        return np.clip(np.rint(np.asarray(resized)), 0, 65535).astype(np.uint16)
    raise ValueError(f"`alpha` must be uint8 or uint16, got {alpha.dtype}")


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8, rounding v / 257 (65535 -> 255, 32896 -> 128)."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
