"""Reading and writing images of every mode: safely, atomically, with clear errors.

Reading (`read_image`) turns whatever Pillow opens into what the model needs: an upright sRGB
``HxWx3`` array (uint8, or uint16 for 16-bit sources) plus a separate alpha plane. An 8-bit RGB file
without an ICC profile or EXIF rotation comes back bit-identical to the official reading,
``np.asarray(PIL.Image.open(path).convert("RGB"))`` (PIPELINE.md 2.1); every 8-bit mode without a
profile gives the same colour values as that call. On top of it:

* EXIF orientation is applied (the official code ignores it) and reset to 1 in the kept EXIF.
* A non-sRGB ICC profile is converted to sRGB with LittleCMS (ImageCms, perceptual intent, which
  LittleCMS replaces by relative colorimetric for matrix profiles); sRGB-tagged pixels are left
  untouched so they keep parity. `LoadedImage.output_icc_profile` is what the output should embed.
* 16-bit sources stay 16-bit. Pillow has no 16-bit RGB mode and decodes 48/64-bit PNG and TIFF
  colour to the high bytes only; `_decode_16bit_colour` decodes the file a second time with the
  byte order of its raw mode swapped, which yields the low bytes, and joins the two.
* Multi-frame files give their first frame, with a warning.
* Every bad input raises `InputError(path, reason)`: one short reason, never a Pillow traceback.

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

Writing (`write_image`) picks the format from `fmt` or the extension, keeps alpha and 16 bits where
the format can hold them, embeds the given ICC profile and EXIF, and never leaves a partial file:
it writes a temp file in the destination folder (``.<name>.<hex>.restoring.tmp``), fsyncs it and
renames it into place; without `overwrite` the rename cannot clobber a file that appeared meanwhile.
Pillow cannot write 16-bit RGB at all, nor EXIF into a compressed TIFF, so PNG-16 and TIFF are
written here (`_write_png16`, `_write_tiff`).

The library never prints: warnings go to ``logging.getLogger("restorecli.images")``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import re
import secrets
import stat
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageCms, TiffImagePlugin, UnidentifiedImageError

from ..errors import InputError, OutputError

logger = logging.getLogger("restorecli.images")

STDIO = "-"
Source = Union[str, os.PathLike, BinaryIO]

#: Pillow's own guard (89,478,485 pixels, about 9459 x 9459); `read_image` refuses anything larger.
DEFAULT_MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
#: Output formats by name or extension (case-insensitive), as Pillow names them.
WRITE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}
DEFAULT_QUALITY = 95

#: Temp files of unfinished writes: ``.<name>.<8 hex>.restoring.tmp`` beside the destination.
TEMP_FILE_SUFFIX = ".restoring.tmp"
TEMP_FILE_GLOB = ".*" + TEMP_FILE_SUFFIX
TEMP_FILE_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}\.restoring\.tmp$", re.DOTALL)


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
        return self.source_mode in _GRAY_MODES


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


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
            rawmode = _tile_rawmode(im)
            _decode(im, label)
            planes = _pixel_planes(im, rawmode, fp, label)
            exif, orientation = _exif_and_orientation(im, label)
            icc_profile = im.info.get("icc_profile") or None
            image_format = im.format
    rgb, output_icc_profile = _to_srgb(planes, icc_profile, label)
    return LoadedImage(
        rgb=_orient(rgb, orientation),
        alpha=None if planes.alpha is None else _orient(planes.alpha, orientation),
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
        mode = _source_mode(im.mode, _tile_rawmode(im))
        if _header_orientation(im) in (5, 6, 7, 8):
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
        detail = None if isinstance(e, UnidentifiedImageError) else _detail(e)
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


def _detail(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _count_frames(im: Image.Image, label: str) -> int:
    """Frames in the file (GIF, APNG, multi-page TIFF, WebP, MPO); warns that only the first is used."""
    try:
        n_frames = int(getattr(im, "n_frames", 1))
        if n_frames > 1:
            im.seek(0)
    except Image.DecompressionBombError as e:
        raise InputError(label, _pillow_bomb_reason(e), hint=_BOMB_HINT) from None
    except Exception as e:  # noqa: BLE001
        raise InputError(label, f"truncated or corrupt image ({_detail(e)})") from None
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
        raise InputError(label, f"truncated or corrupt {im.format or 'image'} data ({_detail(e)})") from None


# --- pixels per mode --------------------------------------------------------------------------


@dataclass
class _Planes:
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
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "LA;16"})


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxW luminance with ITU-R 601 weights (as Pillow's convert("L")), same dtype, rounded."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
    top = np.iinfo(rgb.dtype).max
    return np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, top).astype(rgb.dtype)


# Modes whose colour Pillow's convert("RGB") gives as the official reading does.
_CONVERT_TO_RGB = ("RGBX", "YCbCr", "HSV", "LAB")


def _source_mode(mode: str, rawmode: str | None) -> str:
    if rawmode in _LOW_BYTE_RAWMODES:
        return "RGBA;16" if rawmode.startswith("RGBA") else "RGB;16"
    if rawmode == "LA;16B":
        return "LA;16"
    return mode


def _tile_rawmode(im: Image.Image) -> str | None:
    """The raw mode Pillow will decode with (PNG: a str; TIFF: the first item of a tuple)."""
    if not getattr(im, "tile", None):
        return None
    args = im.tile[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _pixel_planes(im: Image.Image, rawmode: str | None, fp: BinaryIO, label: str) -> _Planes:
    mode = im.mode
    if rawmode in _LOW_BYTE_RAWMODES or rawmode == "LA;16B":
        planes = _decode_16bit_colour(im, rawmode, fp, label)
        if planes is not None:
            return _with_transparency_key(planes, im)
    if rawmode and ";16" in rawmode and mode not in (*_GRAY16_MODES, "I", "F"):  # e.g. CMYK;16, RGBa;16
        logger.warning("%s: 16-bit %s data (raw mode %s) is read as 8-bit", label, mode, rawmode)
    if mode in _GRAY16_MODES:
        gray = np.asarray(im).astype(np.uint16)
        return _with_transparency_key(_Planes(gray[..., None], None, "GRAY", 16, mode), im)
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
        planes = _Planes(pixels[..., None], None, "GRAY", 8, source_mode)
    elif im.mode == "LA":
        planes = _Planes(pixels[..., :1], pixels[..., 1], "GRAY", 8, source_mode)
    elif im.mode == "RGBA":
        planes = _Planes(pixels[..., :3], pixels[..., 3], "RGB", 8, source_mode)
    elif im.mode == "CMYK":
        planes = _Planes(pixels, None, "CMYK", 8, source_mode)
    else:
        planes = _Planes(pixels, None, "RGB", 8, source_mode)
    if source_mode in ("L", "RGB"):
        planes = _with_transparency_key(planes, im)
    return planes


def _decode_16bit_colour(im: Image.Image, rawmode: str, fp: BinaryIO, label: str) -> _Planes | None:
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
        logger.warning("%s: could not decode 16-bit colour (%s); reading it as 8-bit", label, _detail(e))
        return None
    source_mode = _source_mode(im.mode, rawmode)
    if rawmode == "LA;16B":
        both = extra.astype(np.uint16)
        gray = both[..., 0] << 8 | both[..., 1]
        alpha = both[..., 2] << 8 | both[..., 3]
        return _Planes(gray[..., None], alpha, "GRAY", 16, source_mode)
    high = np.asarray(im)
    if extra.shape != high.shape:
        logger.warning("%s: 16-bit decode gave shape %s, not %s; reading as 8-bit", label, extra.shape, high.shape)
        return None
    full = high.astype(np.uint16) << 8 | extra
    if full.shape[2] == 4:
        return _Planes(full[..., :3], full[..., 3], "RGB", 16, source_mode)
    return _Planes(full, None, "RGB", 16, source_mode)


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    args = tile[3]
    args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    if hasattr(tile, "_replace"):  # Pillow >= 11: ImageFile._Tile is a NamedTuple
        return tile._replace(args=args)
    return (*tile[:3], args)


def _planes_from_int32(im: Image.Image, label: str) -> _Planes:
    """Mode I (e.g. signed or 32-bit integer TIFF): accepted as 16-bit gray when it fits 0..65535."""
    values = np.asarray(im)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InputError(label, f"unsupported image mode I (32-bit integers, values {low}..{high} outside 0..65535)")
    return _Planes(values.astype(np.uint16)[..., None], None, "GRAY", 16, "I")


def _with_transparency_key(planes: _Planes, im: Image.Image) -> _Planes:
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
    return _Planes(planes.colour, alpha, planes.space, planes.bit_depth, planes.source_mode)


# --- colour management ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def srgb_profile_bytes() -> bytes:
    """LittleCMS's built-in sRGB profile, embedded in outputs whose pixels were converted to sRGB."""
    return _srgb_profile().tobytes()


_PIL_MODE_OF_SPACE = {"GRAY": "L", "RGB": "RGB", "CMYK": "CMYK"}
_LUT_NODES = 52  # 3D LUT for 16-bit colour: inputs 0, 5, ..., 255 are exact 8-bit values


def _to_srgb(planes: _Planes, icc_profile: bytes | None, label: str) -> tuple[np.ndarray, bytes | None]:
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
        logger.warning("%s: could not apply its ICC profile (%s); using the pixels as they are", label, _detail(e))
        return _without_profile(planes), None
    return rgb, srgb_profile_bytes()


def _without_profile(planes: _Planes) -> np.ndarray:
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
        logger.warning("%s: ignoring an unreadable ICC profile (%s)", label, _detail(e))
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


# --- orientation and EXIF ---------------------------------------------------------------------

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
_TIFF_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 292, 293, 317, 320,
     322, 323, 324, 325, 330, 338, 339, 340, 341, 513, 514, 530, 531, 532, 34675}
)  # fmt: skip


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The upright, contiguous, writable array (arrays from Pillow are read-only)."""
    upright = _UPRIGHT.get(orientation)
    pixels = np.ascontiguousarray(pixels if upright is None else upright(pixels))
    return pixels if pixels.flags.writeable else pixels.copy()


def _header_orientation(im: Image.Image) -> int:
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


def _exif_and_orientation(im: Image.Image, label: str) -> tuple[bytes | None, int]:
    """(EXIF bytes with orientation 1 or None, the orientation to apply: 1..8)."""
    try:
        exif = im.getexif()
        orientation = _valid_orientation(exif.get(_ORIENTATION_TAG, 1))
    except Exception as e:  # noqa: BLE001 - broken EXIF must not cost the image
        logger.warning("%s: ignoring unreadable EXIF (%s)", label, _detail(e))
        return None, 1
    if im.format == "TIFF":
        for tag in _TIFF_LAYOUT_TAGS & set(exif):
            del exif[tag]
    if len(exif) == 0:
        return None, orientation
    if _ORIENTATION_TAG in exif:
        exif[_ORIENTATION_TAG] = 1
    try:
        return exif.tobytes(), orientation
    except Exception as e:  # noqa: BLE001
        logger.warning("%s: dropping EXIF that cannot be re-encoded (%s)", label, _detail(e))
        return None, orientation


# ---------------------------------------------------------------------------------------------
# Pixel helpers for the pipeline
# ---------------------------------------------------------------------------------------------


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

    8-bit: the official TRUNCATION, ``(x*255).clamp(0,255).to(uint8)`` (PIPELINE.md 9.2): scaled,
    clipped, cast toward zero; NaN gives 0. 16-bit: ``round(x*65535)`` clipped to 0..65535.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if bit_depth == 8:
        return np.nan_to_num(np.clip(x * 255, 0, 255), nan=0.0).astype(np.uint8)
    if bit_depth == 16:
        x = x.astype(np.float32) if x.dtype.itemsize < 4 else x  # float16 cannot hold 65535
        return np.nan_to_num(np.clip(np.rint(x * 65535), 0, 65535), nan=0.0).astype(np.uint16)
    raise ValueError(f"`bit_depth` must be 8 or 16, got {bit_depth}")


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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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
        _write_to_stream(sys.stdout.buffer if isinstance(dest, (str, os.PathLike)) else dest, encode, image_format)
    else:
        _write_file_atomically(Path(label), encode, image_format, overwrite=overwrite)


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
        alpha = alpha.astype(np.uint16) * 257 if rgb.dtype == np.uint16 else _to_8bit(alpha)
    return rgb, alpha


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8, rounding v / 257 (65535 -> 255, 32896 -> 128)."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


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
    exif = _exif_for_output(exif, label)
    if image_format == "JPEG" and alpha is not None:
        logger.warning("%s: JPEG has no alpha channel; transparency is dropped", label)
        alpha = None
    if image_format == "JPEG" and exif is not None and len(exif) > 65533:
        logger.warning("%s: EXIF of %d bytes does not fit a JPEG segment; dropped", label, len(exif))
        exif = None
    if rgb.dtype == np.uint16 and image_format in ("JPEG", "WEBP"):
        logger.warning("%s: %s holds 8 bits per channel; 16-bit pixels are rounded to 8 bits", label, image_format)
        rgb = _to_8bit(rgb)
        alpha = None if alpha is None else _to_8bit(alpha)
    pixels = rgb if alpha is None else np.concatenate([rgb, alpha[..., None]], axis=2)
    if image_format == "TIFF":
        if pixels.shape[2] == 2 and pixels.dtype == np.uint16:  # Pillow cannot read 16-bit gray+alpha TIFF back
            pixels = pixels[..., [0, 0, 0, 1]]
        _write_tiff(fp, pixels, icc_profile=icc_profile, exif=exif, label=label)
    elif image_format == "PNG" and pixels.dtype == np.uint16:
        _write_png16(fp, pixels, icc_profile=icc_profile, exif=exif)
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


def _exif_for_output(exif: bytes | None, label: str) -> bytes | None:
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
        logger.warning("%s: dropping unreadable EXIF (%s)", label, _detail(e))
        return None
    return exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif


# --- PNG, 16 bits per channel (Pillow cannot write 48/64-bit PNG) ---------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IDAT_SIZE = 1 << 20


def _png_chunk(fp: BinaryIO, kind: bytes, data: bytes) -> None:
    fp.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _write_png16(fp: BinaryIO, pixels: np.ndarray, *, icc_profile: bytes | None, exif: bytes | None) -> None:
    """Gray, gray+alpha, RGB or RGBA, 16 bits per sample, per-row adaptive None/Sub/Up filters (PNG spec 9, 12.8)."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    fp.write(_PNG_SIGNATURE)
    _png_chunk(fp, b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
    if icc_profile:
        _png_chunk(fp, b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile))
    if exif:
        _png_chunk(fp, b"eXIf", exif.removeprefix(b"Exif\x00\x00"))
    rows = pixels.astype(">u2").view(np.uint8).reshape(height, width * channels * 2)
    bytes_per_pixel = channels * 2
    compressor = zlib.compressobj(6)
    pending = bytearray()
    previous = np.zeros(rows.shape[1], np.uint8)
    batch = max(1, (4 << 20) // rows.shape[1])
    for top in range(0, height, batch):
        block = rows[top : top + batch]
        above = np.vstack([previous[None], block[:-1]])
        sub = block.copy()
        sub[:, bytes_per_pixel:] -= block[:, :-bytes_per_pixel]
        candidates = np.stack([block, sub, block - above])  # filter types 0, 1, 2
        cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)
        choice = cost.argmin(axis=0)
        chosen = candidates[choice, np.arange(len(block))]
        filtered = np.concatenate([choice.astype(np.uint8)[:, None], chosen], axis=1)
        pending += compressor.compress(filtered.tobytes())
        previous = block[-1]
        while len(pending) >= _IDAT_SIZE:
            _png_chunk(fp, b"IDAT", bytes(pending[:_IDAT_SIZE]))
            del pending[:_IDAT_SIZE]
    pending += compressor.flush()
    _png_chunk(fp, b"IDAT", bytes(pending))
    _png_chunk(fp, b"IEND", b"")


# --- TIFF, 8 or 16 bits per channel -----------------------------------------------------------
# Pillow cannot write 16-bit RGB TIFF, and its compressed (libtiff) writer fails on EXIF sub-IFDs,
# so TIFF is written here: little-endian, chunky, Adobe deflate with horizontal differencing.

_STRIP_BYTES = 1 << 20


def _write_tiff(
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
        logger.warning("%s: dropping EXIF that cannot be written to TIFF (%s)", label, _detail(e))
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
        if tag in _TIFF_LAYOUT_TAGS:
            continue
        if tag in (0x8769, 0x8825, 0xA005):  # EXIF, GPS and interoperability IFD pointers
            tags.append((tag, dict(parsed.get_ifd(tag))))
        else:
            tags.append((tag, parsed[tag]))
    return tags


# --- all-or-nothing files ---------------------------------------------------------------------


def _write_to_stream(stream: BinaryIO, encode: Callable[[BinaryIO], None], image_format: str) -> None:
    buffer = io.BytesIO()
    try:
        encode(buffer)
    except Exception as e:  # noqa: BLE001
        raise OutputError(STDIO, f"could not encode {image_format} ({_detail(e)})") from e
    try:
        stream.write(buffer.getbuffer())
        stream.flush()
    except OSError as e:
        raise OutputError(STDIO, f"cannot write ({e.strerror or _detail(e)})") from None


def _write_file_atomically(
    dest: Path, encode: Callable[[BinaryIO], None], image_format: str, *, overwrite: bool
) -> None:
    """Encode into a temp file beside `dest`, fsync, rename into place; remove the temp on any failure."""
    if dest.is_dir():
        raise OutputError(dest, "is a directory")
    if not overwrite and os.path.lexists(dest):
        raise OutputError(dest, "already exists; use --overwrite to replace it")
    folder = dest.parent
    if not folder.is_dir():
        raise OutputError(dest, f"folder {str(folder)!r} does not exist")
    temp, fd = _create_temp_file(dest)
    try:
        with os.fdopen(fd, "wb") as fp:
            try:
                encode(fp)
            except OSError as e:
                if e.errno is None:  # Pillow reports encoder failures as errno-less OSError
                    raise OutputError(dest, f"could not encode {image_format} ({_detail(e)})") from e
                raise
            except Exception as e:  # noqa: BLE001
                raise OutputError(dest, f"could not encode {image_format} ({_detail(e)})") from e
            fp.flush()
            os.fsync(fp.fileno())
        _move_into_place(temp, dest, overwrite=overwrite)
    except OSError as e:
        _remove_quietly(temp)
        raise OutputError(dest, f"cannot write ({e.strerror or _detail(e)})") from None
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_folder(folder)


def _create_temp_file(dest: Path) -> tuple[Path, int]:
    """`.<name>.<8 hex>.restoring.tmp` in dest's folder, created exclusively with the umask's mode."""
    for _ in range(100):
        temp = dest.parent / f".{dest.name[:180]}.{secrets.token_hex(4)}{TEMP_FILE_SUFFIX}"
        try:
            return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or _detail(e))
            raise OutputError(dest, f"cannot create a file in {str(dest.parent)!r} ({reason})") from None
    raise OutputError(dest, "cannot find a free temp file name")


_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}


def _move_into_place(temp: Path, dest: Path, *, overwrite: bool) -> None:
    """os.replace with overwrite; else a no-clobber link + unlink, or a checked rename where links fail."""
    if overwrite:
        try:
            os.replace(temp, dest)
        except IsADirectoryError:
            raise OutputError(dest, "is a directory") from None
        return
    try:
        os.link(temp, dest)
    except FileExistsError:
        raise OutputError(dest, "already exists; use --overwrite to replace it") from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(dest):  # no hard links here (FAT, some network shares): check, then rename
            raise OutputError(dest, "already exists; use --overwrite to replace it") from None
        os.rename(temp, dest)
        return
    _remove_quietly(temp)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not every platform can open a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    """True for a temp file of an unfinished `write_image` (``.<name>.<8 hex>.restoring.tmp``)."""
    return bool(TEMP_FILE_PATTERN.match(Path(path).name))


def remove_stale_temp_files(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Delete the temp files that interrupted writes left in `folder` (and below, if recursive).

    Call it before a run starts writing into the folder, not while another run writes there.
    Returns the paths removed; files that cannot be removed are logged and left.
    """
    root = Path(folder)
    candidates = root.rglob(TEMP_FILE_GLOB) if recursive else root.glob(TEMP_FILE_GLOB)
    removed = []
    for path in sorted(candidates):
        if not is_temp_file(path) or not path.is_file():
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning("%s: cannot remove stale temp file (%s)", path, e.strerror or _detail(e))
            continue
        removed.append(path)
    return removed
