"""ICC profile -> sRGB, so the model always sees sRGB pixels.

A non-sRGB ICC profile is converted to sRGB with LittleCMS (ImageCms, perceptual intent, which
LittleCMS replaces by relative colorimetric for matrix profiles); sRGB-tagged pixels are left
untouched so they keep parity with the official reading. ImageCms transforms only 8-bit data, so
16-bit pixels go through a lookup table sampled from it. `to_srgb` also returns the profile an
output of the pixels should embed (`LoadedImage.output_icc_profile`).
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
from PIL import Image, ImageCms

from .modes import Planes
from .reasons import error_detail

logger = logging.getLogger("restorecli.images")


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def srgb_profile_bytes() -> bytes:
    """LittleCMS's built-in sRGB profile, embedded in outputs whose pixels were converted to sRGB."""
    return _srgb_profile().tobytes()


_PIL_MODE_OF_SPACE = {"GRAY": "L", "RGB": "RGB", "CMYK": "CMYK"}
_LUT_NODES = 52  # 3D LUT for 16-bit colour: inputs 0, 5, ..., 255 are exact 8-bit values


def to_srgb(planes: Planes, icc_profile: bytes | None, label: str) -> tuple[np.ndarray, bytes | None]:
    """(HxWx3 sRGB pixels, profile an output should embed)."""
    profile = _usable_profile(icc_profile, planes.space, label)
    if profile is None:
        return _without_profile(planes), None
    if planes.space == "RGB" and _is_srgb(profile):
        return planes.colour, icc_profile
    try:
        if planes.bit_depth == 8:
            rgb = _cms_convert_8bit(planes.colour, profile, planes.space)
        else:
            rgb = _cms_convert_16bit(planes.colour, profile, planes.space)
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        logger.warning("%s: could not apply its ICC profile (%s); using the pixels as they are", label, error_detail(e))
        return _without_profile(planes), None
    return rgb, srgb_profile_bytes()


def _without_profile(planes: Planes) -> np.ndarray:
    if planes.space == "GRAY":
        return np.repeat(planes.colour, 3, axis=2)
    if planes.space == "CMYK":  # Pillow's naive conversion, as the official convert("RGB")
        cmyk = Image.frombytes("CMYK", (planes.colour.shape[1], planes.colour.shape[0]), planes.colour.tobytes())
        return np.asarray(cmyk.convert("RGB"))
    return planes.colour


def _usable_profile(icc_profile: bytes | None, space: str, label: str) -> ImageCms.ImageCmsProfile | None:
    if not icc_profile:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        logger.warning("%s: ignoring an unreadable ICC profile (%s)", label, error_detail(e))
        return None
    profile_space = profile.profile.xcolor_space.strip().upper()
    if profile_space != space:
        logger.warning("%s: ignoring an ICC profile for %s data on %s pixels", label, profile_space, space)
        return None
    return profile


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    try:
        description = ImageCms.getProfileDescription(profile)
    except ImageCms.PyCMSError:
        return False
    return "srgb" in description.lower()


def _srgb_transform(profile: ImageCms.ImageCmsProfile, space: str) -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(
        profile, _srgb_profile(), _PIL_MODE_OF_SPACE[space], "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
    )


def _cms_convert_8bit(colour: np.ndarray, profile: ImageCms.ImageCmsProfile, space: str) -> np.ndarray:
    height, width = colour.shape[:2]
    image = Image.frombytes(_PIL_MODE_OF_SPACE[space], (width, height), np.ascontiguousarray(colour).tobytes())
    return np.asarray(ImageCms.applyTransform(image, _srgb_transform(profile, space)))


def _cms_convert_16bit(colour: np.ndarray, profile: ImageCms.ImageCmsProfile, space: str) -> np.ndarray:
    """16-bit through a lookup table sampled from LittleCMS (ImageCms transforms only 8-bit data).

    Gray: a 256-entry curve per output channel, linearly interpolated. RGB: a 52^3 grid, trilinearly
    interpolated. The table entries are 8-bit, so the result is accurate to about 1/255 but free of
    the banding an 8-bit round trip would add.
    """
    transform = _srgb_transform(profile, space)
    x = colour.astype(np.float32) / 65535
    if space == "GRAY":
        ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
        table = np.asarray(ImageCms.applyTransform(ramp, transform))[0].astype(np.float32) / 255  # (256, 3)
        nodes = np.linspace(0, 1, 256, dtype=np.float32)
        out = np.stack([np.interp(x[..., 0], nodes, table[:, c]) for c in range(3)], axis=-1)
    else:
        levels = np.arange(0, 256, 5, dtype=np.uint8)
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(1, -1, 3)
        lattice = Image.frombytes("RGB", (grid.shape[1], 1), grid.tobytes())
        table = np.asarray(ImageCms.applyTransform(lattice, transform)).reshape(_LUT_NODES, _LUT_NODES, _LUT_NODES, 3)
        out = _trilinear(x, table.astype(np.float32) / 255)
    return np.clip(np.rint(out * 65535), 0, 65535).astype(np.uint16)


def _trilinear(x: np.ndarray, table: np.ndarray, rows_per_chunk: int = 256) -> np.ndarray:
    """Look up HxWx3 values in [0,1] in an NxNxNx3 table, in row chunks to bound memory."""
    n = table.shape[0]
    out = np.empty(x.shape, np.float32)
    for top in range(0, x.shape[0], rows_per_chunk):
        pos = x[top : top + rows_per_chunk] * (n - 1)
        base = np.minimum(pos.astype(np.int64), n - 2)
        frac = pos - base
        acc = np.zeros(pos.shape, np.float32)
        for corner in range(8):
            offset = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
            weight = np.ones(pos.shape[:2], np.float32)
            for axis in range(3):
                weight *= frac[..., axis] if offset[axis] else 1 - frac[..., axis]
            r, g, b = (base[..., axis] + offset[axis] for axis in range(3))
            acc += weight[..., None] * table[r, g, b]
        out[top : top + rows_per_chunk] = acc
    return out
