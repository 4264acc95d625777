"""EXIF orientation: applied when reading (the official code ignores it), reset to 1 in kept EXIF.

Reading turns the pixels upright with one numpy view per orientation (as ImageOps.exif_transpose)
and keeps the file's EXIF with orientation 1; writing makes sure the EXIF it embeds says 1 as well,
since the pixels it writes are upright. A TIFF's pixel-layout tags are not EXIF and are not carried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from PIL import Image

from .reasons import error_detail

logger = logging.getLogger("restorecli.images")

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the numpy view that shows the image upright (as ImageOps.exif_transpose).
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
# TIFF tags that describe the pixel layout of the file they are in; they are not EXIF to carry on.
TIFF_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 292, 293, 317, 320,
     322, 323, 324, 325, 330, 338, 339, 340, 341, 513, 514, 530, 531, 532, 34675}
)  # fmt: skip


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The upright, contiguous, writable array (arrays from Pillow are read-only)."""
    upright = _UPRIGHT.get(orientation)
    pixels = np.ascontiguousarray(pixels if upright is None else upright(pixels))
    return pixels if pixels.flags.writeable else pixels.copy()


def header_orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PNG's getexif() would load the image to look
    for an eXIf chunk after the pixel data, so only one before it is used here)."""
    try:
        if im.format == "PNG":
            exif = Image.Exif()
            if im.info.get("exif"):
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        return _valid_orientation(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - broken EXIF: no rotation
        return 1


def _valid_orientation(value: object) -> int:
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def exif_and_orientation(im: Image.Image, label: str) -> tuple[bytes | None, int]:
    """(EXIF bytes with orientation 1 or None, the orientation to apply: 1..8)."""
    try:
        exif = im.getexif()
        orientation = _valid_orientation(exif.get(_ORIENTATION_TAG, 1))
    except Exception as e:  # noqa: BLE001 - broken EXIF must not cost the image
        logger.warning("%s: ignoring unreadable EXIF (%s)", label, error_detail(e))
        return None, 1
    if im.format == "TIFF":
        for tag in TIFF_LAYOUT_TAGS & set(exif):
            del exif[tag]
    if len(exif) == 0:
        return None, orientation
    if _ORIENTATION_TAG in exif:
        exif[_ORIENTATION_TAG] = 1
    try:
        return exif.tobytes(), orientation
    except Exception as e:  # noqa: BLE001
        logger.warning("%s: dropping EXIF that cannot be re-encoded (%s)", label, error_detail(e))
        return None, orientation


def exif_for_output(exif: bytes | None, label: str) -> bytes | None:
    """EXIF bytes with orientation 1 (the pixels are upright), or None when empty or unreadable."""
    if not exif:
        return None
    parsed = Image.Exif()
    try:
        parsed.load(exif)
        if len(parsed) == 0:
            return None
        if parsed.get(_ORIENTATION_TAG, 1) != 1:
            parsed[_ORIENTATION_TAG] = 1
            return parsed.tobytes()
    except Exception as e:  # noqa: BLE001
        logger.warning("%s: dropping unreadable EXIF (%s)", label, error_detail(e))
        return None
    return exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif
