"""Pillow's image modes to colour and alpha planes, with 16-bit sources kept 16-bit.

Modes (Pillow's) and what `read_image` gives:
  RGB, RGBX, YCbCr, HSV, LAB  -> uint8 RGB (Pillow's convert("RGB"))
  1, L                        -> uint8 RGB, three equal channels; a PNG colour key gives alpha
  LA, La, RGBA, RGBa, PA      -> uint8 RGB + alpha
  P                           -> uint8 RGB, + alpha when the palette has transparency
  CMYK                        -> uint8 RGB through its ICC profile, else Pillow's conversion
  I;16, I;16B (16-bit gray)   -> uint16 RGB, three equal channels
  I (32-bit integer)          -> uint16 as 16-bit gray when all values are in 0..65535, else an error
  16-bit RGB / RGBA / gray+alpha PNG, 16-bit RGB / RGBA TIFF -> uint16 RGB (+ alpha), exact
  16-bit CMYK, planar or premultiplied 16-bit TIFF -> what Pillow gives (8 bits), with a warning
  F (32-bit float)            -> InputError "unsupported image mode F"

Pillow has no 16-bit RGB mode and decodes 48/64-bit PNG and TIFF colour to the high bytes only;
`_decode_16bit_colour` decodes the file a second time with the byte order of its raw mode swapped,
which yields the low bytes, and joins the two. The planes keep the file's colour space (gray, RGB or
CMYK) so that colour.py can apply its ICC profile before anything becomes RGB.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..errors import InputError
from .reasons import error_detail

logger = logging.getLogger("restorecli.images")


@dataclass
class Planes:
    """A decoded image before colour management: its colour channels in the file's space, and alpha."""

    colour: np.ndarray  # HxWxC in `space`: C = 1 (GRAY), 3 (RGB), 4 (CMYK)
    alpha: np.ndarray | None
    space: str  # "GRAY" | "RGB" | "CMYK"
    bit_depth: int
    source_mode: str


# Raw modes of 16-bit colour that Pillow decodes to 8 bits (high bytes), and the raw mode of the
# other byte order, which decodes the low bytes of the same data.
_NATIVE_OTHER = "B" if sys.byteorder == "little" else "L"
_LOW_BYTE_RAWMODES = {
    f"{base};16{order}": f"{base};16{other}"
    for base in ("RGB", "RGBA", "RGBX")
    for order, other in (("B", "L"), ("L", "B"), ("N", _NATIVE_OTHER))
}
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Source modes with one colour channel; their outputs are written back as grayscale.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "LA;16"})


# Modes whose colour Pillow's convert("RGB") gives as the official reading does.
_CONVERT_TO_RGB = ("RGBX", "YCbCr", "HSV", "LAB")


def source_mode_of(mode: str, rawmode: str | None) -> str:
    if rawmode in _LOW_BYTE_RAWMODES:
        return "RGBA;16" if rawmode.startswith("RGBA") else "RGB;16"
    if rawmode == "LA;16B":
        return "LA;16"
    return mode


def tile_rawmode(im: Image.Image) -> str | None:
    """The raw mode Pillow will decode with (PNG: a str; TIFF: the first item of a tuple)."""
    if not getattr(im, "tile", None):
        return None
    args = im.tile[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def pixel_planes(im: Image.Image, rawmode: str | None, fp: BinaryIO, label: str) -> Planes:
    mode = im.mode
    if rawmode in _LOW_BYTE_RAWMODES or rawmode == "LA;16B":
        planes = _decode_16bit_colour(im, rawmode, fp, label)
        if planes is not None:
            return _with_transparency_key(planes, im)
    if rawmode and ";16" in rawmode and mode not in (*_GRAY16_MODES, "I", "F"):  # e.g. CMYK;16, RGBa;16
        logger.warning("%s: 16-bit %s data (raw mode %s) is read as 8-bit", label, mode, rawmode)
    if mode in _GRAY16_MODES:
        gray = np.asarray(im).astype(np.uint16)
        return _with_transparency_key(Planes(gray[..., None], None, "GRAY", 16, mode), im)
    if mode == "I":
        return _planes_from_int32(im, label)
    if mode == "F":
        raise InputError(label, "unsupported image mode F (32-bit floating point)")

    source_mode = mode
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if im.has_transparency_data else "RGB")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode in _CONVERT_TO_RGB:
        im = im.convert("RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
        raise InputError(label, f"unsupported image mode {mode}")
    pixels = np.asarray(im)
    if im.mode == "L":
        planes = Planes(pixels[..., None], None, "GRAY", 8, source_mode)
    elif im.mode == "LA":
        planes = Planes(pixels[..., :1], pixels[..., 1], "GRAY", 8, source_mode)
    elif im.mode == "RGBA":
        planes = Planes(pixels[..., :3], pixels[..., 3], "RGB", 8, source_mode)
    elif im.mode == "CMYK":
        planes = Planes(pixels, None, "CMYK", 8, source_mode)
    else:
        planes = Planes(pixels, None, "RGB", 8, source_mode)
    if source_mode in ("L", "RGB"):
        planes = _with_transparency_key(planes, im)
    return planes


def _decode_16bit_colour(im: Image.Image, rawmode: str, fp: BinaryIO, label: str) -> Planes | None:
    """Full 16-bit RGB(A) / gray+alpha from a second decode; None (8-bit fallback) if it fails.

    RGB(A): decoding with the other byte order's raw mode unpacks the low byte of each sample
    (same bits per pixel, so PNG un-filtering and TIFF predictors work as usual); `im` holds the
    high bytes. Gray+alpha PNG (raw mode "LA;16B", Pillow mode RGBA): raw mode "RGBA" has the same
    32 bits per pixel and unpacks all four bytes, gray high/low and alpha high/low.
    """
    other = "RGBA" if rawmode == "LA;16B" else _LOW_BYTE_RAWMODES[rawmode]
    try:
        fp.seek(0)
        with Image.open(fp) as again:
            again.tile = [_with_rawmode(tile, other) for tile in again.tile]
            again.load()
            extra = np.asarray(again)
    except Exception as e:  # noqa: BLE001 - keep the 8-bit reading Pillow already gave
        logger.warning("%s: could not decode 16-bit colour (%s); reading it as 8-bit", label, error_detail(e))
        return None
    source_mode = source_mode_of(im.mode, rawmode)
    if rawmode == "LA;16B":
        both = extra.astype(np.uint16)
        gray = both[..., 0] << 8 | both[..., 1]
        alpha = both[..., 2] << 8 | both[..., 3]
        return Planes(gray[..., None], alpha, "GRAY", 16, source_mode)
    high = np.asarray(im)
    if extra.shape != high.shape:
        logger.warning("%s: 16-bit decode gave shape %s, not %s; reading as 8-bit", label, extra.shape, high.shape)
        return None
    full = high.astype(np.uint16) << 8 | extra
    if full.shape[2] == 4:
        return Planes(full[..., :3], full[..., 3], "RGB", 16, source_mode)
    return Planes(full, None, "RGB", 16, source_mode)


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    args = tile[3]
    args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    if hasattr(tile, "_replace"):  # Pillow >= 11: ImageFile._Tile is a NamedTuple
        return tile._replace(args=args)
    return (*tile[:3], args)


def _planes_from_int32(im: Image.Image, label: str) -> Planes:
    """Mode I (e.g. signed or 32-bit integer TIFF): accepted as 16-bit gray when it fits 0..65535."""
    values = np.asarray(im)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InputError(label, f"unsupported image mode I (32-bit integers, values {low}..{high} outside 0..65535)")
    return Planes(values.astype(np.uint16)[..., None], None, "GRAY", 16, "I")


def _with_transparency_key(planes: Planes, im: Image.Image) -> Planes:
    """A PNG tRNS colour key (one transparent gray or RGB value) becomes an alpha plane."""
    key = im.info.get("transparency")
    if planes.alpha is not None or key is None or isinstance(key, bytes):
        return planes
    key_values = key if isinstance(key, tuple) else (key,)
    top = np.iinfo(planes.colour.dtype).max
    if len(key_values) != planes.colour.shape[2] or any(not 0 <= int(v) <= top for v in key_values):
        return planes
    transparent = (planes.colour == np.array(key_values, planes.colour.dtype)).all(axis=-1)
    alpha = np.where(transparent, 0, top).astype(planes.colour.dtype)
    return Planes(planes.colour, alpha, planes.space, planes.bit_depth, planes.source_mode)
