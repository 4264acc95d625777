"""A TIFF writer for 8 and 16 bits per channel.

Pillow cannot write 16-bit RGB TIFF, and its compressed (libtiff) writer fails on EXIF sub-IFDs, so
TIFF is written here: little-endian, chunky, Adobe deflate with horizontal differencing, the ICC
profile and the source's EXIF tags in IFD0 (TIFF 6.0). Pillow's ImageFileDirectory encodes the tags.
"""

from __future__ import annotations

import logging
import struct
import zlib
from typing import BinaryIO

import numpy as np
from PIL import Image, TiffImagePlugin

from .exif import TIFF_LAYOUT_TAGS
from .reasons import error_detail

logger = logging.getLogger("restorecli.images")

_STRIP_BYTES = 1 << 20


def write_tiff(
    fp: BinaryIO, pixels: np.ndarray, *, icc_profile: bytes | None, exif: bytes | None, label: str = "TIFF"
) -> None:
    height, width, channels = pixels.shape
    bits = pixels.dtype.itemsize * 8
    samples = pixels.astype("<u2" if bits == 16 else np.uint8)
    differences = samples.copy()
    differences[:, 1:] -= samples[:, :-1]  # predictor 2, per sample, modulo 2**bits (TIFF 6.0, section 14)
    row_bytes = width * channels * bits // 8
    rows_per_strip = max(1, min(height, _STRIP_BYTES // row_bytes))
    strips = [zlib.compress(differences[top : top + rows_per_strip].tobytes(), 6) for top in range(0, height, rows_per_strip)]
    layout = {
        256: width,  # ImageWidth
        257: height,  # ImageLength
        258: (bits,) * channels,  # BitsPerSample
        259: 8,  # Compression: Adobe deflate
        262: 2 if channels >= 3 else 1,  # PhotometricInterpretation: RGB, or BlackIsZero (gray)
        273: tuple(int(x) for x in np.cumsum([0] + [len(s) for s in strips[:-1]])),  # StripOffsets, from the data start
        277: channels,  # SamplesPerPixel
        278: rows_per_strip,  # RowsPerStrip
        279: tuple(len(s) for s in strips),  # StripByteCounts
        284: 1,  # PlanarConfiguration: chunky
        317: 2,  # Predictor: horizontal differencing
        339: (1,) * channels,  # SampleFormat: unsigned
    }
    if channels in (2, 4):
        layout[338] = (2,)  # ExtraSamples: unassociated alpha
    if icc_profile:
        layout[34675] = icc_profile  # ICCProfile
    try:
        directory = _tiff_directory(layout, _exif_tags(exif))
    except Exception as e:  # noqa: BLE001 - odd EXIF values must not cost the image
        logger.warning("%s: dropping EXIF that cannot be written to TIFF (%s)", label, error_detail(e))
        directory = _tiff_directory(layout, [])
    fp.write(b"II*\x00" + struct.pack("<I", 8))
    fp.write(directory)
    for strip in strips:
        fp.write(strip)


def _tiff_directory(layout: dict[int, object], extra_tags: list[tuple[int, object]]) -> bytes:
    """IFD0 at offset 8; Pillow moves StripOffsets past the directory's end, where the strips follow."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    for tag, value in extra_tags:
        ifd[tag] = value
    for tag, value in layout.items():
        ifd[tag] = value
    return ifd.tobytes(8)


def _exif_tags(exif: bytes | None) -> list[tuple[int, object]]:
    """IFD0 tags of `exif` that do not describe a pixel layout; sub-IFDs (EXIF, GPS) as dicts."""
    if not exif:
        return []
    parsed = Image.Exif()
    parsed.load(exif)
    tags = []
    for tag in parsed:
        if tag in TIFF_LAYOUT_TAGS:
            continue
        if tag in (0x8769, 0x8825, 0xA005):  # EXIF, GPS and interoperability IFD pointers
            tags.append((tag, dict(parsed.get_ifd(tag))))
        else:
            tags.append((tag, parsed[tag]))
    return tags
