"""Opening an image file, stream or stdin safely: size limits, decompression bombs, clear errors.

`read_image` reads a path, "-" (stdin) or a binary stream fully and returns a `LoadedImage`: upright
sRGB ``HxWx3`` pixels (uint8, or uint16 for 16-bit sources) and a separate alpha plane. An 8-bit RGB
file without an ICC profile or EXIF rotation comes back bit-identical to the official reading,
``np.asarray(PIL.Image.open(path).convert("RGB"))`` (DiffBIR diffbir/inference/loop.py,
InferenceLoop.load_lq); every 8-bit mode without a profile gives the same colour values as that call.
Multi-frame files give their first frame, with a warning. Every bad input raises
`InputError(path, reason)`: one short reason, never a Pillow traceback. The pixels of each mode come
from modes.py, the sRGB conversion from colour.py, the orientation from exif.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .colour import to_srgb
from .exif import exif_and_orientation, header_orientation, orient
from .formats import STDIO
from .modes import GRAY_MODES, pixel_planes, source_mode_of, tile_rawmode
from .reasons import error_detail

logger = logging.getLogger("restorecli.images")

Source = Union[str, os.PathLike, BinaryIO]

#: Pillow's own guard (89,478,485 pixels, about 9459 x 9459); `read_image` refuses anything larger.
DEFAULT_MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An image as the model sees it: upright, sRGB, colour and alpha apart.

    rgb: HxWx3, uint8 (bit_depth 8) or uint16 (bit_depth 16).
    alpha: HxW with rgb's dtype, or None when the source has no transparency.
    icc_profile: the original embedded profile bytes (None without one).
    exif: EXIF bytes (``Exif\\0\\0`` + TIFF structure) with orientation reset to 1, or None.
    source_mode: Pillow's mode, or "RGB;16" / "RGBA;16" / "LA;16" for 16-bit colour PNG/TIFF.
    format: Pillow's format name ("PNG", "JPEG", ...). path: the path, or "-" for stdin/streams.
    output_icc_profile: what an output of these pixels should embed: the original profile when it
        is sRGB (pixels untouched), the sRGB profile when the pixels were converted to it, None when
        the input had no usable profile.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    icc_profile: bytes | None
    exif: bytes | None
    source_mode: str
    format: str | None
    n_frames: int
    path: str
    output_icc_profile: bytes | None = None

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None

    @property
    def is_gray(self) -> bool:
        """True when the source stores one colour channel (1, L, LA, I;16...): outputs are written gray."""
        return self.source_mode in GRAY_MODES


def read_image(source: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read `source` (a path, "-" for stdin, or a binary file object) fully and safely.

    Raises InputError naming the file for: no such file, permission denied, a directory, an empty
    file, not an image, a truncated or corrupt file, more than `max_pixels` pixels (None: no limit
    of ours; Pillow's DecompressionBombError at 2 x Image.MAX_IMAGE_PIXELS still applies), a
    zero-size image, an unsupported mode (32-bit float, out-of-range 32-bit integers).
    """
    label = _source_label(source)
    with _open_source(source, label) as fp:
        with _open_pillow(fp, label, max_pixels) as im:
            n_frames = _count_frames(im, label)
            rawmode = tile_rawmode(im)
            _decode(im, label)
            planes = pixel_planes(im, rawmode, fp, label)
            exif, orientation = exif_and_orientation(im, label)
            icc_profile = im.info.get("icc_profile") or None
            image_format = im.format
    rgb, output_icc_profile = to_srgb(planes, icc_profile, label)
    return LoadedImage(
        rgb=orient(rgb, orientation),
        alpha=None if planes.alpha is None else orient(planes.alpha, orientation),
        bit_depth=planes.bit_depth,
        icc_profile=icc_profile,
        exif=exif,
        source_mode=planes.source_mode,
        format=image_format,
        n_frames=n_frames,
        path=label,
        output_icc_profile=output_icc_profile,
    )


def probe(path: str | os.PathLike[str]) -> tuple[int, int, str]:
    """(width, height, mode) from the header alone, no pixel decoding.

    The size is the upright one (EXIF orientation 5-8 swaps it); the mode is `source_mode`'s.
    Raises InputError like `read_image` for files Pillow cannot open.
    """
    label = os.fspath(path)
    with _open_source(path, label) as fp, _open_pillow(fp, label, None) as im:
        width, height = im.size
        mode = source_mode_of(im.mode, tile_rawmode(im))
        if header_orientation(im) in (5, 6, 7, 8):
            width, height = height, width
        return width, height, mode


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when Pillow recognises the content of `path` (not its name). Never raises.

    Only the header is read. A file too large to decode still counts (reading it then reports why).
    """
    try:
        if not os.path.isfile(path):
            return False
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - any failure means "not an image we can use"
        return False


def _source_label(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return STDIO


@contextlib.contextmanager
def _open_source(source: Source, label: str) -> Iterator[BinaryIO]:
    """A seekable binary file for Pillow; file-system problems become InputError."""
    if isinstance(source, (str, os.PathLike)) and label != STDIO:
        fp = _open_file(label)
        with fp:
            yield fp
        return
    stream = sys.stdin.buffer if isinstance(source, (str, os.PathLike)) else source
    try:
        data = stream.read()
    except OSError as e:
        raise InputError(label, f"cannot read ({e.strerror or e})") from None
    if not data:
        raise InputError(label, "empty input (0 bytes)")
    yield io.BytesIO(data)


def _open_file(path: str) -> BinaryIO:
    try:
        fp = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory") from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except OSError as e:
        raise InputError(path, f"cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fp.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise InputError(path, "is a directory")
        if stat.S_ISREG(st.st_mode):
            if st.st_size == 0:
                raise InputError(path, "empty file (0 bytes)")
            return fp
        data = fp.read()  # a pipe or device: Pillow needs to seek, so hold it in memory
    except InputError:
        fp.close()
        raise
    except OSError as e:
        fp.close()
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    fp.close()
    if not data:
        raise InputError(path, "empty input (0 bytes)")
    return io.BytesIO(data)


def _open_pillow(fp: BinaryIO, label: str, max_pixels: int | None) -> Image.Image:
    """Image.open (header only) with every failure turned into InputError; checks the size."""
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise InputError(label, _pillow_bomb_reason(e), hint=_BOMB_HINT) from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, or a plugin choking on a header
        fp.seek(0)
        detail = None if isinstance(e, UnidentifiedImageError) else error_detail(e)
        raise InputError(label, _unopenable_reason(fp.read(32), detail)) from None
    width, height = im.size
    if width <= 0 or height <= 0:
        im.close()
        raise InputError(label, f"zero-size image ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise InputError(
            label,
            f"image too large ({width} x {height} = {width * height} pixels > limit {max_pixels}); "
            "it could be a decompression bomb",
            hint=_BOMB_HINT,
        )
    return im


_BOMB_HINT = "raise the pixel limit if you trust this file"
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _unopenable_reason(head: bytes, detail: str | None) -> str:
    """Pillow could not open the file. Say more when the signature shows what it meant to be."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        if width == 0 or height == 0:
            return f"zero-size image ({width} x {height})"
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind is not None:
        return f"unreadable {kind} file ({detail or 'corrupt, truncated or an unsupported variant'})"
    if detail is not None:
        return f"unreadable image header ({detail})"
    return "not an image (unknown format)"


def _pillow_bomb_reason(e: Exception) -> str:
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    size = f"{m.group(1)} pixels > Pillow's limit {m.group(2)}" if m else "over Pillow's pixel limit"
    return f"image too large ({size}); it could be a decompression bomb"


def _count_frames(im: Image.Image, label: str) -> int:
    """Frames in the file (GIF, APNG, multi-page TIFF, WebP, MPO); warns that only the first is used."""
    try:
        n_frames = int(getattr(im, "n_frames", 1))
        if n_frames > 1:
            im.seek(0)
    except Image.DecompressionBombError as e:
        raise InputError(label, _pillow_bomb_reason(e), hint=_BOMB_HINT) from None
    except Exception as e:  # noqa: BLE001
        raise InputError(label, f"truncated or corrupt image ({error_detail(e)})") from None
    if n_frames > 1:
        if im.format == "MPO":  # a camera JPEG whose extra frames are previews or depth maps
            logger.debug("%s: MPO with %d pictures; using the primary one", label, n_frames)
        else:
            logger.warning("%s: %s file has %d frames; using the first frame only", label, im.format, n_frames)
    return n_frames


def _decode(im: Image.Image, label: str) -> None:
    """Decode every pixel now, so truncation shows here (Pillow's LOAD_TRUNCATED_IMAGES stays False)."""
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise InputError(label, _pillow_bomb_reason(e), hint=_BOMB_HINT) from None
    except MemoryError:
        raise InputError(label, f"not enough memory to decode {im.width} x {im.height} pixels") from None
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, zlib.error, struct.error, ...
        raise InputError(label, f"truncated or corrupt {im.format or 'image'} data ({error_detail(e)})") from None
