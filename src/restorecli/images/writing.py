"""Encoding and writing an image: alpha, 16 bits, ICC profile and EXIF kept where the format holds them.

`write_image` picks the format from `fmt` or the extension (formats.py), keeps alpha and 16 bits
where the format can hold them (with a warning where it cannot), embeds the given ICC profile and
EXIF, and writes all or nothing (atomic.py). Pillow cannot write 16-bit RGB at all, nor EXIF into a
compressed TIFF, so 16-bit PNG and every TIFF go through the writers in png16.py and tiff.py.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..errors import OutputError
from .atomic import write_file_atomically, write_to_stream
from .exif import exif_for_output
from .formats import STDIO, WRITE_FORMATS
from .pixels import to_8bit
from .png16 import write_png16
from .tiff import write_tiff

logger = logging.getLogger("restorecli.images")

DEFAULT_QUALITY = 95


def output_format(dest: str | os.PathLike[str] | BinaryIO, fmt: str | None = None) -> str:
    """Pillow's format name from `fmt`, else from dest's extension (case-insensitive); "-" gives PNG."""
    if fmt is not None:
        name = WRITE_FORMATS.get(fmt.lower().lstrip("."))
        if name is None:
            raise ValueError(f"`fmt` must be one of png, jpg, jpeg, webp, tif, tiff; got {fmt!r}")
        return name
    if not isinstance(dest, (str, os.PathLike)) or os.fspath(dest) == STDIO:
        return "PNG"
    name = WRITE_FORMATS.get(Path(dest).suffix.lower().lstrip("."))
    if name is None:
        raise OutputError(dest, "cannot tell the image format from the extension; use .png, .jpg, .webp or .tif")
    return name


def write_image(
    dest: str | os.PathLike[str] | BinaryIO,
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    fmt: str | None = None,
    quality: int = DEFAULT_QUALITY,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    overwrite: bool = False,
) -> None:
    """Write `rgb` (HxWx3 uint8/uint16, or HxW for grayscale) and optional `alpha` (HxW) to `dest`,
    all or nothing.

    dest: a path, "-" (sys.stdout.buffer) or a binary stream; a stream gets the whole encoded file
    in one write, after encoding succeeded. A path is written through a temp file in its folder and
    renamed into place; an existing file is replaced only with `overwrite` (else OutputError, even
    if it appeared while encoding). Format: `fmt` or the extension. 16-bit stays 16-bit in PNG and
    TIFF, and is rounded to 8 bits with a warning for JPEG and WebP. Alpha is kept by PNG, WebP and
    TIFF; JPEG drops it with a warning. `quality` (1-100) applies to JPEG (4:4:4 chroma from 90 up)
    and WebP. `icc_profile` and `exif` are embedded as given, with EXIF orientation set to 1.
    Raises ValueError for bad arrays or options, OutputError when the file cannot be written.
    """
    image_format = output_format(dest, fmt)
    rgb, alpha = _checked_pixels(rgb, alpha)
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"`quality` must be an integer from 1 to 100, got {quality!r}")
    label = os.fspath(dest) if isinstance(dest, (str, os.PathLike)) else STDIO

    def encode(fp: BinaryIO) -> None:
        _encode(fp, rgb, alpha, image_format, quality, icc_profile, exif, label)

    if label == STDIO:
        write_to_stream(sys.stdout.buffer if isinstance(dest, (str, os.PathLike)) else dest, encode, image_format)
    else:
        write_file_atomically(Path(label), encode, image_format, overwrite=overwrite)


def encode_image(
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    fmt: str = "png",
    quality: int = DEFAULT_QUALITY,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """The bytes `write_image` would write for format `fmt` (same rules)."""
    buffer = io.BytesIO()
    write_image(buffer, rgb, alpha=alpha, fmt=fmt, quality=quality, icc_profile=icc_profile, exif=exif)
    return buffer.getvalue()


def _checked_pixels(rgb: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    rgb = np.ascontiguousarray(rgb)  # views (e.g. a permuted tensor's numpy) cannot be reinterpreted as bytes
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3) or rgb.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"`rgb` must be an HxWx3 (or HxW gray) uint8 or uint16 array, got shape {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"`rgb` must not be empty, got shape {rgb.shape}")
    if alpha is None:
        return rgb, None
    alpha = np.asarray(alpha)
    if alpha.shape != rgb.shape[:2] or alpha.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"`alpha` must be a {rgb.shape[:2]} uint8 or uint16 array, got {alpha.shape} {alpha.dtype}")
    alpha = np.ascontiguousarray(alpha)
    if alpha.dtype != rgb.dtype:
        alpha = alpha.astype(np.uint16) * 257 if rgb.dtype == np.uint16 else to_8bit(alpha)
    return rgb, alpha


def _encode(
    fp: BinaryIO,
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    image_format: str,
    quality: int,
    icc_profile: bytes | None,
    exif: bytes | None,
    label: str,
) -> None:
    exif = exif_for_output(exif, label)
    if image_format == "JPEG" and alpha is not None:
        logger.warning("%s: JPEG has no alpha channel; transparency is dropped", label)
        alpha = None
    if image_format == "JPEG" and exif is not None and len(exif) > 65533:
        logger.warning("%s: EXIF of %d bytes does not fit a JPEG segment; dropped", label, len(exif))
        exif = None
    if rgb.dtype == np.uint16 and image_format in ("JPEG", "WEBP"):
        logger.warning("%s: %s holds 8 bits per channel; 16-bit pixels are rounded to 8 bits", label, image_format)
        rgb = to_8bit(rgb)
        alpha = None if alpha is None else to_8bit(alpha)
    pixels = rgb if alpha is None else np.concatenate([rgb, alpha[..., None]], axis=2)
    if image_format == "TIFF":
        if pixels.shape[2] == 2 and pixels.dtype == np.uint16:  # Pillow cannot read 16-bit gray+alpha TIFF back
            pixels = pixels[..., [0, 0, 0, 1]]
        write_tiff(fp, pixels, icc_profile=icc_profile, exif=exif, label=label)
    elif image_format == "PNG" and pixels.dtype == np.uint16:
        write_png16(fp, pixels, icc_profile=icc_profile, exif=exif)
    else:
        options: dict = {}
        if icc_profile:
            options["icc_profile"] = icc_profile
        if exif:
            options["exif"] = exif
        if image_format == "JPEG":
            options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
        elif image_format == "WEBP":
            options.update(quality=quality)
        image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels))
        image.save(fp, format=image_format, **options)
