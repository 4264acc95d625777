"""restorecli.images: every mode reads to the documented arrays, writes keep what the format can hold,
bad inputs give one clear InputError, and writes are all or nothing.

Every fixture is made here with Pillow, numpy or a few lines of struct (16-bit PNG/TIFF and ICC
profiles, which Pillow cannot write).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image, ImageCms, ImageFile, ImageOps

from conftest import permissions_enforced
from restorecli import images
from restorecli.errors import InputError, OutputError
from restorecli.images.formats import FORMAT_EXTENSIONS
from restorecli.images import (
    encode_image,
    from_float,
    is_image_file,
    is_temp_file,
    probe,
    read_image,
    remove_stale_temp_files,
    resize_alpha,
    to_float,
    write_image,
    writing,
)
from restorecli.run.outputs import output_name

RNG = np.random.default_rng(1234)


def skip_unless_permissions_are_enforced(folder: Path) -> None:
    """Then "permission denied" cannot be provoked."""
    if not permissions_enforced(folder):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod does not block reads or writes")


def random_u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def random_u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


def official_reading(path: Path) -> np.ndarray:
    """DiffBIR diffbir/inference/loop.py, InferenceLoop.load_lq: PIL.Image.open(path).convert("RGB")."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(images.TEMP_FILE_SUFFIX)]


# --- fixture builders Pillow lacks ---------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16_bytes(pixels: np.ndarray, *, icc: bytes | None = None) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by channel count), filter 0 on every row."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    extra = _png_chunk(b"iCCP", b"test\x00\x00" + zlib.compress(icc)) if icc else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
        + extra
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def tiff16_bytes(pixels: np.ndarray, order: str) -> bytes:
    """An uncompressed 16-bit RGB(A) TIFF in byte order "<" (II) or ">" (MM), one strip."""
    height, width, channels = pixels.shape
    data = pixels.astype(order + "u2").tobytes()
    tags = [(256, 4, [width]), (257, 4, [height]), (258, 3, [16] * channels), (259, 3, [1]), (262, 3, [2]),
            (273, 4, [0]), (277, 3, [channels]), (278, 4, [height]), (279, 4, [len(data)]), (284, 3, [1])]  # fmt: skip
    if channels == 4:
        tags.append((338, 3, [2]))
    extra_at = 8 + 2 + 12 * len(tags) + 4
    extra = b""
    blobs = []
    for tag, kind, values in tags:
        blob = struct.pack(order + ("H" if kind == 3 else "I") * len(values), *values)
        if len(blob) > 4:
            blobs.append((tag, kind, len(values), struct.pack(order + "I", extra_at + len(extra))))
            extra += blob
        else:
            blobs.append((tag, kind, len(values), blob.ljust(4, b"\x00")))
    data_at = extra_at + len(extra)
    entries = b""
    for tag, kind, count, value in blobs:
        if tag == 273:
            value = struct.pack(order + "I", data_at)
        entries += struct.pack(order + "HHI", tag, kind, count) + value
    header = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    return header + struct.pack(order + "H", len(tags)) + entries + b"\x00" * 4 + extra + data


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _icc(device_class: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2.1 profile with the given tags (LittleCMS accepts it)."""
    table, data = b"", b""
    start = 128 + 4 + 12 * len(tags)
    for signature, body in tags:
        body += b"\x00" * (-len(body) % 4)
        table += struct.pack(">4sII", signature, start + len(data), len(body))
        data += body
    header = struct.pack(">I4sI4s4s4s12s4s", start + len(data), b"lcms", 0x02100000, device_class, space, pcs, b"\x00" * 12, b"acsp")
    header += b"\x00" * 28 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\x00" * 48
    return header + struct.pack(">I", len(tags)) + table + data


def _desc(text: str) -> bytes:
    ascii_text = text.encode() + b"\x00"
    return b"desc\x00\x00\x00\x00" + struct.pack(">I", len(ascii_text)) + ascii_text + b"\x00" * 78


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \x00\x00\x00\x00" + _s15(x) + _s15(y) + _s15(z)


def _gamma(g: float) -> bytes:
    return b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, round(g * 256))


def adobe_rgb_profile() -> bytes:
    """Adobe RGB (1998) primaries (D50-adapted) with gamma 2.2: a matrix/TRC RGB profile."""
    return _icc(b"mntr", b"RGB ", b"XYZ ", [
        (b"desc", _desc("Test Adobe RGB (1998)")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(0.60974, 0.31111, 0.01947)), (b"gXYZ", _xyz(0.20528, 0.62567, 0.06087)),
        (b"bXYZ", _xyz(0.14919, 0.06322, 0.74457)),
        (b"rTRC", _gamma(2.2)), (b"gTRC", _gamma(2.2)), (b"bTRC", _gamma(2.2)),
    ])  # fmt: skip


def gray_profile(gamma: float) -> bytes:
    return _icc(b"mntr", b"GRAY", b"XYZ ", [(b"desc", _desc("Test gray")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"kTRC", _gamma(gamma))])


def cmyk_profile() -> bytes:
    """A printer profile whose A2B0 is a 2-point CLUT (lut8) to Lab: a tinted CMYK -> RGB."""
    corners = [
        [round(255 * (1 - c) * (1 - k) * 0.9), round(255 * (1 - m) * (1 - k)), round(255 * (1 - y) * (1 - k) * 0.8)]
        for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)
    ]  # fmt: skip
    rgb = Image.fromarray(np.array(corners, np.uint8).reshape(1, 16, 3))
    lab = np.asarray(ImageCms.profileToProfile(rgb, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), outputMode="LAB"))
    lab = lab.reshape(16, 3).astype(np.int16)
    lab[:, 1:] = lab[:, 1:].astype(np.uint8).view(np.int8).astype(np.int16) + 128  # Pillow's signed a*, b* -> ICC's offset
    identity = bytes(range(256))
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1\x00\x00\x00\x00" + bytes([4, 3, 2, 0]) + matrix + identity * 4 + lab.astype(np.uint8).tobytes() + identity * 3
    return _icc(b"prtr", b"CMYK", b"Lab ", [(b"desc", _desc("Test CMYK")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"A2B0", lut)])


def cms_to_srgb(image: Image.Image, profile: bytes) -> np.ndarray:
    """The conversion done directly with ImageCms, for comparison."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(
        image, source, ImageCms.createProfile("sRGB"), renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
    )
    return np.asarray(converted)


def profile_description(icc: bytes) -> str:
    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))


# --- reading: the official parity case -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "bmp", "tif"])
def test_8bit_rgb_is_bit_identical_to_the_official_reading(tmp_path, fmt):
    path = tmp_path / f"photo.{fmt}"
    Image.fromarray(random_u8(23, 31, 3)).save(path)
    loaded = read_image(path)
    assert loaded.rgb.dtype == np.uint8 and loaded.bit_depth == 8
    assert np.array_equal(loaded.rgb, official_reading(path))
    assert loaded.alpha is None and loaded.icc_profile is None and loaded.output_icc_profile is None
    assert loaded.n_frames == 1 and loaded.path == str(path) and loaded.source_mode == "RGB"
    assert loaded.rgb.flags.writeable and loaded.rgb.flags.c_contiguous


def make_8bit_mode_image(mode: str) -> Image.Image:
    if mode == "1":
        return Image.fromarray(random_u8(9, 13) > 127)
    if mode == "P":
        return Image.fromarray(random_u8(9, 13, 3)).quantize(16)
    if mode == "PA":
        return Image.fromarray(random_u8(9, 13, 3)).quantize(16).convert("PA")
    return Image.frombytes(mode, (13, 9), random_u8(9, 13, Image.getmodebands(mode)).tobytes())


@pytest.mark.parametrize(
    ("mode", "fmt", "has_alpha"),
    [("1", "png", False), ("L", "png", False), ("LA", "png", True), ("P", "png", False), ("PA", "tif", True),
     ("RGBA", "png", True), ("CMYK", "jpg", False), ("CMYK", "tif", False), ("YCbCr", "tif", False),
     ("LAB", "tif", False)],
)  # fmt: skip
def test_every_8bit_mode_gives_the_official_colours(tmp_path, mode, fmt, has_alpha):
    path = tmp_path / f"{mode}.{fmt}"
    if mode == "YCbCr" and int(PIL.__version__.split(".")[0]) < 13:
        # (gradio, the ui extra, holds Pillow below 13)
        pytest.skip(f"Pillow {PIL.__version__} writes a YCbCr TIFF it cannot read back (it reports the file "
                    "truncated and opens it as RGB), so the fixture cannot be made; Pillow 13 can")
    make_8bit_mode_image(mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    loaded = read_image(path)
    assert loaded.source_mode == mode and loaded.bit_depth == 8 and loaded.rgb.dtype == np.uint8
    assert loaded.rgb.shape == (9, 13, 3)
    assert np.array_equal(loaded.rgb, official_reading(path))
    assert (loaded.alpha is not None) == has_alpha


def test_gray_gives_three_equal_channels(tmp_path):
    gray = random_u8(7, 5)
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = read_image(tmp_path / "g.png")
    assert loaded.rgb.shape == (7, 5, 3)
    for c in range(3):
        assert np.array_equal(loaded.rgb[..., c], gray)


def test_gray_alpha_gives_colour_and_alpha(tmp_path):
    la = random_u8(6, 8, 2)
    Image.frombytes("LA", (8, 6), la.tobytes()).save(tmp_path / "la.png")
    loaded = read_image(tmp_path / "la.png")
    assert np.array_equal(loaded.rgb, np.repeat(la[..., :1], 3, axis=2))
    assert np.array_equal(loaded.alpha, la[..., 1])


def test_palette_with_transparency_gives_alpha(tmp_path):
    indices = RNG.integers(0, 4, (6, 9), dtype=np.uint8)
    im = Image.fromarray(indices, "L").convert("P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    im.save(tmp_path / "p.png", transparency=2)
    loaded = read_image(tmp_path / "p.png")
    assert loaded.source_mode == "P"
    assert np.array_equal(loaded.rgb, official_reading(tmp_path / "p.png"))
    assert np.array_equal(loaded.alpha, np.where(indices == 2, 0, 255).astype(np.uint8))


def test_rgb_colour_key_transparency_gives_alpha(tmp_path):
    rgb = random_u8(5, 6, 3)
    rgb[0, 0] = rgb[3, 4] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "key.png", transparency=(10, 20, 30))
    loaded = read_image(tmp_path / "key.png")
    assert np.array_equal(loaded.rgb, rgb)
    expected = np.full((5, 6), 255, np.uint8)
    expected[(rgb == (10, 20, 30)).all(axis=-1)] = 0
    assert np.array_equal(loaded.alpha, expected)


def test_rgba_keeps_colour_and_alpha_apart(tmp_path):
    rgba = random_u8(8, 7, 4)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    loaded = read_image(tmp_path / "a.png")
    assert np.array_equal(loaded.rgb, rgba[..., :3]) and np.array_equal(loaded.alpha, rgba[..., 3])


def test_cmyk_without_profile_is_pillows_conversion(tmp_path):
    make_8bit_mode_image("CMYK").save(tmp_path / "c.tif")
    loaded = read_image(tmp_path / "c.tif")
    assert np.array_equal(loaded.rgb, official_reading(tmp_path / "c.tif"))
    assert loaded.output_icc_profile is None


@pytest.mark.parametrize("fmt", ["jpg", "tif"])
def test_cmyk_with_profile_is_converted_through_it(tmp_path, fmt):
    profile = cmyk_profile()
    image = make_8bit_mode_image("CMYK")
    image.save(tmp_path / f"c.{fmt}", icc_profile=profile)
    loaded = read_image(tmp_path / f"c.{fmt}")
    with Image.open(tmp_path / f"c.{fmt}") as stored:
        expected = cms_to_srgb(stored, profile)
        naive = np.asarray(stored.convert("RGB"))
    assert np.array_equal(loaded.rgb, expected)
    assert not np.array_equal(loaded.rgb, naive)
    assert loaded.icc_profile == profile
    assert loaded.output_icc_profile == images.srgb_profile_bytes()


# --- reading: 16 bits ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16bit_gray_reads_exact_values(tmp_path, fmt):
    gray = random_u16(9, 11)
    Image.fromarray(gray).save(tmp_path / f"g16.{fmt}")  # Pillow mode I;16
    loaded = read_image(tmp_path / f"g16.{fmt}")
    assert loaded.bit_depth == 16 and loaded.rgb.dtype == np.uint16
    assert loaded.source_mode.startswith("I;16")
    assert all(np.array_equal(loaded.rgb[..., c], gray) for c in range(3))


def test_16bit_gray_alpha_png_reads_exact_values(tmp_path):
    la = random_u16(5, 7, 2)
    (tmp_path / "la16.png").write_bytes(png16_bytes(la))
    loaded = read_image(tmp_path / "la16.png")
    assert loaded.source_mode == "LA;16" and loaded.bit_depth == 16
    assert np.array_equal(loaded.rgb, np.repeat(la[..., :1], 3, axis=2))
    assert np.array_equal(loaded.alpha, la[..., 1])


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize(("fmt", "order"), [("png", ">"), ("tif", "<"), ("tif", ">")])
def test_16bit_colour_survives_read_write_read_exactly(tmp_path, fmt, order, channels):
    pixels = random_u16(6, 10, channels)
    pixels[0, 0] = 0
    pixels[0, 1] = 65535
    source = tmp_path / f"in.{fmt}"
    source.write_bytes(png16_bytes(pixels) if fmt == "png" else tiff16_bytes(pixels, order))
    loaded = read_image(source)
    assert loaded.bit_depth == 16 and loaded.source_mode == ("RGB;16" if channels == 3 else "RGBA;16")
    assert np.array_equal(loaded.rgb, pixels[..., :3])
    assert (loaded.alpha is None) if channels == 3 else np.array_equal(loaded.alpha, pixels[..., 3])
    for out_fmt in ("png", "tif"):
        out = tmp_path / f"out.{out_fmt}"
        write_image(out, loaded.rgb, alpha=loaded.alpha)
        again = read_image(out)
        assert again.bit_depth == 16 and np.array_equal(again.rgb, pixels[..., :3])
        assert (again.alpha is None) if channels == 3 else np.array_equal(again.alpha, pixels[..., 3])
        with Image.open(out) as plain:  # an ordinary reader sees the high bytes
            assert np.array_equal(np.asarray(plain)[..., :3], (pixels[..., :3] >> 8).astype(np.uint8))


def test_16bit_written_as_8bit_where_the_format_needs_it(tmp_path, caplog):
    pixels = random_u16(4, 5, 3)
    with caplog.at_level(logging.WARNING, logger="restorecli.images"):
        write_image(tmp_path / "o.webp", pixels, quality=100)
        write_image(tmp_path / "o.jpg", pixels)
    assert sum("rounded to 8 bits" in r.getMessage() for r in caplog.records) == 2
    assert read_image(tmp_path / "o.webp").bit_depth == 8


# --- reading: colour profiles and orientation -----------------------------------------------------


def test_adobe_rgb_is_converted_to_srgb_and_the_output_says_so(tmp_path):
    profile = adobe_rgb_profile()
    image = Image.fromarray(random_u8(12, 10, 3))
    image.save(tmp_path / "adobe.png", icc_profile=profile)
    loaded = read_image(tmp_path / "adobe.png")
    assert np.array_equal(loaded.rgb, cms_to_srgb(image, profile))
    assert not np.array_equal(loaded.rgb, np.asarray(image))
    assert loaded.icc_profile == profile
    assert "sRGB" in profile_description(loaded.output_icc_profile)
    for fmt in ("png", "jpg", "webp", "tif"):
        out = tmp_path / f"out.{fmt}"
        write_image(out, loaded.rgb, icc_profile=loaded.output_icc_profile)
        with Image.open(out) as written:
            assert "sRGB" in profile_description(written.info["icc_profile"]), fmt


def test_srgb_tagged_pixels_are_left_untouched(tmp_path):
    srgb = images.srgb_profile_bytes()
    rgb = random_u8(6, 6, 3)
    Image.fromarray(rgb).save(tmp_path / "s.jpg", icc_profile=srgb, quality=100)
    loaded = read_image(tmp_path / "s.jpg")
    assert np.array_equal(loaded.rgb, official_reading(tmp_path / "s.jpg"))
    assert loaded.output_icc_profile == srgb


def test_gray_with_a_gray_profile_is_converted(tmp_path):
    profile = gray_profile(1.0)
    image = Image.fromarray(random_u8(5, 7))
    image.save(tmp_path / "g.png", icc_profile=profile)
    loaded = read_image(tmp_path / "g.png")
    assert np.array_equal(loaded.rgb, cms_to_srgb(image, profile))
    assert loaded.output_icc_profile == images.srgb_profile_bytes()


def test_16bit_with_a_profile_matches_littlecms_through_the_lookup_table(tmp_path):
    profile = adobe_rgb_profile()
    levels = (RNG.integers(0, 52, (6, 9, 3)) * 5).astype(np.uint8)  # exact table nodes
    smooth = random_u16(6, 9, 3)
    (tmp_path / "nodes.png").write_bytes(png16_bytes(levels.astype(np.uint16) * 257, icc=profile))
    (tmp_path / "smooth.png").write_bytes(png16_bytes(smooth, icc=profile))
    at_nodes = read_image(tmp_path / "nodes.png")
    assert at_nodes.bit_depth == 16
    assert np.array_equal(at_nodes.rgb, cms_to_srgb(Image.fromarray(levels), profile).astype(np.uint16) * 257)
    between = read_image(tmp_path / "smooth.png").rgb.astype(np.int64)
    reference = cms_to_srgb(Image.fromarray(((smooth.astype(np.uint32) + 128) // 257).astype(np.uint8)), profile)
    assert np.abs(between - reference.astype(np.int64) * 257).max() <= 6 * 257


def test_16bit_gray_with_a_gray_profile_matches_littlecms_at_every_8bit_level(tmp_path):
    profile = gray_profile(1.0)
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    (tmp_path / "g16.png").write_bytes(png16_bytes(levels.astype(np.uint16) * 257, icc=profile))
    loaded = read_image(tmp_path / "g16.png")
    assert loaded.bit_depth == 16
    assert np.array_equal(loaded.rgb, cms_to_srgb(Image.fromarray(levels), profile).astype(np.uint16) * 257)


def test_unreadable_profile_is_ignored_with_a_warning(tmp_path, caplog):
    rgb = random_u8(4, 4, 3)
    Image.fromarray(rgb).save(tmp_path / "bad.png", icc_profile=b"not a profile at all")
    with caplog.at_level(logging.WARNING, logger="restorecli.images"):
        loaded = read_image(tmp_path / "bad.png")
    assert np.array_equal(loaded.rgb, rgb) and loaded.output_icc_profile is None
    assert any("ICC profile" in r.getMessage() for r in caplog.records)


def png_with_orientation(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())


def test_exif_orientation_6_rotates_the_pixels(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # stored top-left
    png_with_orientation(tmp_path / "o6.png", pixels, 6)
    loaded = read_image(tmp_path / "o6.png")
    assert loaded.rgb.shape == (3, 2, 3)  # 90 degrees clockwise: the stored top-left is now top-right
    assert tuple(loaded.rgb[0, 1]) == (255, 0, 0)
    assert loaded.rgb[..., 0].sum() == 255
    exif = Image.Exif()
    exif.load(loaded.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "TestCam"
    assert probe(tmp_path / "o6.png") == (2, 3, "RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(tmp_path, orientation):
    pixels = random_u8(3, 5, 4)
    png_with_orientation(tmp_path / "o.png", pixels, orientation)
    loaded = read_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        upright = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(loaded.rgb, upright[..., :3]) and np.array_equal(loaded.alpha, upright[..., 3])


# --- reading: frames and streams ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gif", "tif", "png"])
def test_multi_frame_file_gives_the_first_frame_and_a_warning(tmp_path, caplog, fmt):
    frames = [Image.fromarray(np.full((4, 6, 3), value, np.uint8)) for value in (10, 128, 250)]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="restorecli.images"):
        loaded = read_image(path)
    assert loaded.n_frames == 3
    assert np.array_equal(loaded.rgb, official_reading(path))
    assert np.all(np.abs(loaded.rgb.astype(int) - 10) <= 2)
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(path) in m and "3 frames" in m for m in messages), messages


def test_read_from_a_stream_and_from_stdin(tmp_path, monkeypatch):
    rgb = random_u8(5, 4, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    loaded = read_image(io.BytesIO(buffer.getvalue()))
    assert np.array_equal(loaded.rgb, rgb) and loaded.path == "-"

    png_bytes = buffer.getvalue()

    class FakeStdin:
        buffer = io.BytesIO(png_bytes)

    monkeypatch.setattr(sys, "stdin", FakeStdin)
    assert np.array_equal(read_image("-").rgb, rgb)


def test_empty_stdin_is_a_clear_error(monkeypatch):
    class FakeStdin:
        buffer = io.BytesIO(b"")

    monkeypatch.setattr(sys, "stdin", FakeStdin)
    with pytest.raises(InputError, match=r"^<stdin>: empty input"):
        read_image("-")


# --- reading: errors -------------------------------------------------------------------------------


def png_file(path: Path, size=(16, 12)) -> Path:
    Image.fromarray(random_u8(size[1], size[0], 3)).save(path, format="PNG")
    return path


def expect_input_error(path, reason: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        read_image(path, **kwargs)
    error = caught.value
    assert str(path) in str(error), str(error)
    assert reason in error.reason, error.reason
    assert "\n" not in str(error)
    return error


def test_missing_file(tmp_path):
    expect_input_error(tmp_path / "nope.png", "no such file")


def test_directory(tmp_path):
    expect_input_error(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    expect_input_error(tmp_path / "empty.png", "empty file (0 bytes)")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n")
    expect_input_error(tmp_path / "notes.jpg", "not an image (unknown format)")


def test_truncated_png(tmp_path):
    whole = png_file(tmp_path / "whole.png", (64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    expect_input_error(tmp_path / "cut.png", "truncated")


def test_png_cut_inside_its_header(tmp_path):
    whole = png_file(tmp_path / "whole.png").read_bytes()
    (tmp_path / "stub.png").write_bytes(whole[:20])
    expect_input_error(tmp_path / "stub.png", "unreadable PNG file")


def test_zero_size_png(tmp_path):
    header = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    (tmp_path / "zero.png").write_bytes(data)
    expect_input_error(tmp_path / "zero.png", "zero-size image (0 x 5)")


def test_decompression_bomb_over_our_limit(tmp_path):
    path = png_file(tmp_path / "big.png", (40, 30))
    error = expect_input_error(path, "image too large (40 x 30 = 1200 pixels > limit 1000)", max_pixels=1000)
    assert error.hint
    assert read_image(path, max_pixels=1200).rgb.shape == (30, 40, 3)


def test_decompression_bomb_over_pillows_limit(tmp_path, monkeypatch):
    path = png_file(tmp_path / "big.png", (40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises above 2x its limit
    expect_input_error(path, "image too large", max_pixels=None)


def test_float_images_are_an_unsupported_mode(tmp_path):
    Image.fromarray(RNG.random((4, 4), dtype=np.float32)).save(tmp_path / "f.tif")
    expect_input_error(tmp_path / "f.tif", "unsupported image mode F")


def test_permission_denied(tmp_path):
    skip_unless_permissions_are_enforced(tmp_path)
    path = png_file(tmp_path / "locked.png")
    path.chmod(0)
    try:
        expect_input_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_is_image_file_looks_at_content(tmp_path):
    png_file(tmp_path / "real.dat")
    (tmp_path / "fake.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert is_image_file(tmp_path / "real.dat")
    assert not is_image_file(tmp_path / "fake.png")
    assert not is_image_file(tmp_path / "empty.jpg")
    assert not is_image_file(tmp_path)
    assert not is_image_file(tmp_path / "missing.png")


def test_probe_reads_the_header_and_fails_like_read_image(tmp_path):
    assert probe(png_file(tmp_path / "p.png", (16, 12))) == (16, 12, "RGB")
    (tmp_path / "p16.png").write_bytes(png16_bytes(random_u16(3, 4, 3)))
    assert probe(tmp_path / "p16.png") == (4, 3, "RGB;16")
    with pytest.raises(InputError, match="not an image"):
        (tmp_path / "t.png").write_text("x")
        probe(tmp_path / "t.png")


# --- writing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "webp", "tif"])
def test_alpha_is_kept(tmp_path, fmt):
    rgb, alpha = random_u8(9, 8, 3), random_u8(9, 8)
    write_image(tmp_path / f"a.{fmt}", rgb, alpha=alpha, quality=100)
    loaded = read_image(tmp_path / f"a.{fmt}")
    assert np.array_equal(loaded.alpha, alpha)
    if fmt != "webp":
        assert np.array_equal(loaded.rgb, rgb)


def test_jpeg_drops_alpha_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="restorecli.images"):
        write_image(tmp_path / "a.jpg", random_u8(9, 8, 3), alpha=random_u8(9, 8))
    assert read_image(tmp_path / "a.jpg").alpha is None
    assert any("alpha" in r.getMessage() and "a.jpg" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("name", "expected"), [("x.PNG", "PNG"), ("x.JpG", "JPEG"), ("x.JPEG", "JPEG"), ("x.WebP", "WEBP"), ("x.TIFF", "TIFF"), ("x.Tif", "TIFF")])
def test_extensions_are_case_insensitive(tmp_path, name, expected):
    write_image(tmp_path / name, random_u8(4, 4, 3))
    assert read_image(tmp_path / name).format == expected


WRITTEN_AS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}


@pytest.mark.parametrize(("fmt", "expected"), WRITTEN_AS.items())
def test_output_planning_and_the_writer_agree_on_every_format(tmp_path, fmt, expected):
    """Each `--format` value gets an extension the writer takes, and the file is that format."""
    assert set(FORMAT_EXTENSIONS) == set(WRITTEN_AS)  # a new format comes with a row here
    name = output_name("scan.gif", fmt=fmt)
    write_image(tmp_path / name, random_u8(4, 4, 3))
    assert read_image(tmp_path / name).format == expected
    write_image(tmp_path / "x.out", random_u8(4, 4, 3), fmt=fmt)
    assert read_image(tmp_path / "x.out").format == expected
    (tmp_path / "x.out").unlink()


def test_fmt_overrides_the_extension_and_unknown_extensions_are_refused(tmp_path):
    write_image(tmp_path / "x.out", random_u8(4, 4, 3), fmt="JPG")
    assert read_image(tmp_path / "x.out").format == "JPEG"
    with pytest.raises(OutputError, match="extension"):
        write_image(tmp_path / "x.bmp", random_u8(4, 4, 3))
    with pytest.raises(ValueError, match="`fmt`"):
        write_image(tmp_path / "x.png", random_u8(4, 4, 3), fmt="gif")


@pytest.mark.parametrize(("fmt", "dtype"), [("png", np.uint8), ("png", np.uint16), ("jpg", np.uint8), ("webp", np.uint8), ("tif", np.uint8), ("tif", np.uint16)])
def test_icc_and_exif_are_embedded_with_orientation_1(tmp_path, fmt, dtype):
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0x9003] = "2021:02:03 04:05:06"
    rgb = random_u8(5, 6, 3).astype(dtype)
    icc = adobe_rgb_profile()
    write_image(tmp_path / f"m.{fmt}", rgb, icc_profile=icc, exif=exif.tobytes())
    with Image.open(tmp_path / f"m.{fmt}") as written:
        assert written.info.get("icc_profile") == icc
        got = written.getexif()
        assert got[0x010F] == "TestCam" and got[0x0112] == 1
        assert got.get_ifd(0x8769)[0x9003] == "2021:02:03 04:05:06"


def test_write_to_stdout_and_to_a_stream(monkeypatch):
    rgb = random_u8(6, 5, 3)

    class FakeStdout:
        buffer = io.BytesIO()

    monkeypatch.setattr(sys, "stdout", FakeStdout)
    write_image("-", rgb)
    assert FakeStdout.buffer.getvalue().startswith(b"\x89PNG")
    assert np.array_equal(read_image(io.BytesIO(FakeStdout.buffer.getvalue())).rgb, rgb)
    stream = io.BytesIO()
    write_image(stream, rgb, fmt="jpg")
    assert stream.getvalue().startswith(b"\xff\xd8")
    assert encode_image(rgb, fmt="png") == FakeStdout.buffer.getvalue()


def test_write_rejects_bad_arrays_and_options(tmp_path):
    with pytest.raises(ValueError, match="`rgb`"):
        write_image(tmp_path / "x.png", random_u8(4, 4, 2))  # HxW (gray) and HxWx3 only
    with pytest.raises(ValueError, match="`rgb`"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="`alpha`"):
        write_image(tmp_path / "x.png", random_u8(4, 4, 3), alpha=random_u8(3, 4))
    with pytest.raises(ValueError, match="`quality`"):
        write_image(tmp_path / "x.jpg", random_u8(4, 4, 3), quality=0)
    assert list(tmp_path.iterdir()) == []


def test_alpha_of_another_depth_is_scaled(tmp_path):
    rgb16, alpha8 = random_u16(3, 4, 3), random_u8(3, 4)
    write_image(tmp_path / "x.png", rgb16, alpha=alpha8)
    assert np.array_equal(read_image(tmp_path / "x.png").alpha, alpha8.astype(np.uint16) * 257)


# --- writing: all or nothing -------------------------------------------------------------------


def test_existing_file_is_kept_without_overwrite(tmp_path):
    dest = tmp_path / "out.png"
    dest.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        write_image(dest, random_u8(4, 4, 3))
    assert dest.read_bytes() == b"precious"
    write_image(dest, random_u8(4, 4, 3), overwrite=True)
    assert read_image(dest).rgb.shape == (4, 4, 3)
    assert no_temp_files(tmp_path)


def test_a_file_that_appears_while_encoding_is_never_replaced(tmp_path, monkeypatch):
    dest = tmp_path / "out.png"
    original_encode = writing._encode

    def encode_while_someone_else_writes(fp, *args):
        dest.write_bytes(b"someone else's")
        original_encode(fp, *args)

    monkeypatch.setattr(writing, "_encode", encode_while_someone_else_writes)
    with pytest.raises(OutputError, match="already exists"):
        write_image(dest, random_u8(4, 4, 3))
    assert dest.read_bytes() == b"someone else's"
    assert no_temp_files(tmp_path)


def test_no_clobber_without_hard_links_falls_back_to_a_checked_rename(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    write_image(tmp_path / "a.png", random_u8(4, 4, 3))
    assert read_image(tmp_path / "a.png").rgb.shape == (4, 4, 3)
    with pytest.raises(OutputError, match="already exists"):
        write_image(tmp_path / "a.png", random_u8(4, 4, 3))
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_an_encoder_error_leaves_nothing_behind(tmp_path, monkeypatch, fmt):
    def broken(*args, **kwargs):
        raise OSError("encoder error -2")  # what Pillow raises, without an errno

    monkeypatch.setattr(Image.Image, "save", broken)
    monkeypatch.setattr(writing, "write_tiff", broken)
    with pytest.raises(OutputError, match="could not encode"):
        write_image(tmp_path / f"x.{fmt}", random_u8(4, 4, 3))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        write_image(tmp_path / "x.png", random_u8(4, 4, 3))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_while_encoding_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(writing, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "x.png", random_u8(4, 4, 3))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_image(tmp_path / "no" / "x.png", random_u8(4, 4, 3))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_an_output_error(tmp_path):
    skip_unless_permissions_are_enforced(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            write_image(folder / "x.png", random_u8(4, 4, 3))
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_written_files_get_ordinary_permissions(tmp_path):
    write_image(tmp_path / "x.png", random_u8(4, 4, 3))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_temp_file_helpers(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".a.png.0123abcd.restoring.tmp", tmp_path / "sub" / ".b c.tif.deadbeef.restoring.tmp"]
    kept = [tmp_path / "a.png", tmp_path / "a.restoring.tmp", tmp_path / ".a.png.xyz.restoring.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert all(is_temp_file(p) for p in stale) and not any(is_temp_file(p) for p in kept)
    assert remove_stale_temp_files(tmp_path) == [stale[0]]
    assert remove_stale_temp_files(tmp_path, recursive=True) == [stale[1]]
    assert all(p.exists() for p in kept)


def test_temp_files_are_named_for_the_cleanup(tmp_path, monkeypatch):
    seen = []
    original_encode = writing._encode

    def spy(fp, *args):
        seen.extend(p for p in tmp_path.iterdir())
        original_encode(fp, *args)

    monkeypatch.setattr(writing, "_encode", spy)
    write_image(tmp_path / "x.png", random_u8(4, 4, 3))
    assert len(seen) == 1 and is_temp_file(seen[0]) and seen[0].name.startswith(".x.png.")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# --- pixel helpers -----------------------------------------------------------------------------


def test_from_float_8bit_is_the_official_truncation():
    torch = pytest.importorskip("torch")
    x = np.concatenate([RNG.random(10000, dtype=np.float32) * 1.2 - 0.1, np.float32([0, 1, 0.999999, 1 / 255, 254.9999 / 255, -0.0, 2.0])])
    expected = (torch.from_numpy(x) * 255).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(from_float(x, 8), expected)
    assert from_float(np.float32([0.5]), 8)[0] == 127  # truncated, not rounded
    assert from_float(np.float32([np.nan]), 8)[0] == 0


def test_from_float_16bit_rounds_and_to_float_inverts_it():
    values = random_u16(1000)
    assert np.array_equal(from_float(to_float(values), 16), values)
    assert from_float(np.float32([-1, 0.5, 2]), 16).tolist() == [0, 32768, 65535]
    u8 = random_u8(100)
    assert to_float(u8).dtype == np.float32
    assert np.array_equal(to_float(u8), u8.astype(np.float32) / 255)
    with pytest.raises(ValueError):
        to_float(np.zeros(3, np.int32))
    with pytest.raises(ValueError):
        from_float(np.zeros(3, np.float32), 12)


def test_resize_alpha_is_pil_bicubic_and_keeps_the_dtype():
    alpha = random_u8(7, 9)
    resized = resize_alpha(alpha, (18, 14))
    assert resized.dtype == np.uint8 and resized.shape == (14, 18)
    assert np.array_equal(resized, np.asarray(Image.fromarray(alpha).resize((18, 14), Image.Resampling.BICUBIC)))
    alpha16 = alpha.astype(np.uint16) * 257
    wide = resize_alpha(alpha16, (18, 14))
    assert wide.dtype == np.uint16 and wide.shape == (14, 18)
    unclipped = np.asarray(Image.fromarray(alpha16.astype(np.float32)).resize((18, 14), Image.Resampling.BICUBIC))
    assert np.array_equal(wide, np.clip(np.rint(unclipped), 0, 65535).astype(np.uint16))


# -- grayscale outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("ext, dtype", [("png", np.uint8), ("png", np.uint16), ("tif", np.uint8), ("tif", np.uint16)])
def test_gray_written_as_one_channel_lossless(tmp_path, ext, dtype):
    rng = np.random.default_rng(7)
    gray = rng.integers(0, np.iinfo(dtype).max + 1, (23, 31), dtype=dtype)
    alpha = rng.integers(0, np.iinfo(dtype).max + 1, (23, 31), dtype=dtype)
    for a in (None, alpha):
        dest = tmp_path / f"g{'a' if a is not None else ''}.{ext}"
        images.write_image(dest, gray, alpha=a)
        back = images.read_image(dest)
        # 16-bit gray+alpha TIFF is written as RGBA (Pillow cannot read the two-channel layout back)
        assert back.is_gray or (ext, dtype, a is not None) == ("tif", np.uint16, True)
        assert back.bit_depth == np.iinfo(dtype).bits
        assert np.array_equal(back.rgb[..., 0], gray) and np.array_equal(back.rgb[..., 2], gray)
        if a is not None:
            assert np.array_equal(back.alpha, a)


def test_non_contiguous_pixels_are_written(tmp_path):
    rgb16 = np.random.default_rng(3).integers(0, 65536, (3, 12, 9), dtype=np.uint16).transpose(1, 2, 0)
    assert not rgb16.flags.c_contiguous
    images.write_image(tmp_path / "t.png", rgb16)
    assert np.array_equal(images.read_image(tmp_path / "t.png").rgb, rgb16)


def test_to_gray_uses_pillow_luminance_weights():
    rgb = np.random.default_rng(4).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    assert np.abs(images.to_gray(rgb).astype(int) - expected).max() <= 1
