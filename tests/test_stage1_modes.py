"""Every image mode round-trips through `restore --stage1-only` with the tiny reference cleaner:
alpha kept, bit depth kept, orientation applied, ICC profile embedded, grayscale stays grayscale."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from restorecli.cli.app import main

H, W = 30, 41  # odd sizes; the output is 1.5x: int(41*1.5) x int(30*1.5) = 61 x 45


def _rgb(seed, h=H, w=W):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def restored(reference_dir, tmp_path_factory):
    """Write one file per mode, restore them all in one CLI run, return (folder, outputs folder)."""
    src = tmp_path_factory.mktemp("modes")
    out = src / "out"
    Image.fromarray(_rgb(1)).save(src / "rgb.png")
    rgba = np.dstack([_rgb(2), np.linspace(0, 255, W, dtype=np.uint8)[None].repeat(H, 0)])
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    Image.fromarray(_rgb(3)[..., 0]).save(src / "gray.png")
    Image.fromarray((np.random.default_rng(4).random((H, W)) * 65535).astype(np.uint16)).save(src / "gray16.png")
    Image.fromarray(_rgb(5)).convert("P", palette=Image.ADAPTIVE).save(src / "palette.gif")
    Image.fromarray(_rgb(6)).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_rgb(7)).save(src / "rotated.jpg", exif=exif.tobytes(), quality=95)
    adobe = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))  # any embedded profile travels as sRGB
    Image.fromarray(_rgb(8)).save(src / "profiled.png", icc_profile=adobe.tobytes())
    files = sorted(str(p) for p in src.iterdir() if p.is_file())
    code = main([*files, "-o", str(out) + "/", "--model", str(reference_dir / "model_eps.json"), "--stage1-only",
                 "--upscale", "1.5", "--device", "cpu"])
    assert code == 0
    return out


def _open(out, name):
    return Image.open(out / name)


def test_rgb(restored):
    im = _open(restored, "rgb_restored.png")
    assert (im.mode, im.size) == ("RGB", (61, 45))


def test_alpha_is_kept_and_upscaled(restored):
    im = _open(restored, "rgba_restored.png")
    assert (im.mode, im.size) == ("RGBA", (61, 45))
    alpha = np.asarray(im)[..., 3].astype(int)
    assert alpha[:, 0].mean() < 20 and alpha[:, -1].mean() > 235  # the left-to-right ramp survived


def test_gray_stays_gray(restored):
    im = _open(restored, "gray_restored.png")
    assert (im.mode, im.size) == ("L", (61, 45))


def test_16_bit_stays_16_bit(restored):
    from restorecli.images import read_image

    back = read_image(restored / "gray16_restored.png")
    assert back.bit_depth == 16 and back.is_gray and back.rgb.shape[:2] == (45, 61)
    assert len(np.unique(back.rgb[..., 0])) > 256  # really more than 8 bits of levels


def test_palette_and_cmyk_become_rgb(restored):
    assert _open(restored, "palette_restored.png").mode == "RGB"
    im = _open(restored, "cmyk_restored.jpg")
    assert (im.mode, im.size) == ("RGB", (61, 45))


def test_orientation_applied(restored):
    im = _open(restored, "rotated_restored.jpg")
    assert im.size == (45, 61)  # upright: the 41x30 stored image displays as 30x41
    assert im.getexif().get(0x0112, 1) == 1


def test_icc_profile_embedded(restored):
    im = _open(restored, "profiled_restored.png")
    profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


def test_bad_files_fail_cleanly_and_write_nothing(reference_dir, tmp_path, capsys):
    from PIL import PngImagePlugin  # noqa: F401  (registers PNG)

    good = io.BytesIO()
    Image.fromarray(_rgb(9, 64, 64)).save(good, "PNG")
    (tmp_path / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("this is not a JPEG")
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    data = bytearray(bomb.getvalue())
    data[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width/height: 100000 x 100000
    import zlib

    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    out = tmp_path / "out"
    code = main([str(tmp_path / n) for n in ("truncated.png", "text.jpg", "bomb.png")]
                + ["-o", str(out) + "/", "--model", str(reference_dir / "model_eps.json"), "--stage1-only"])
    err = capsys.readouterr().err
    assert code == 1
    assert "truncated.png: truncated or corrupt" in err
    assert "text.jpg: not an image" in err
    assert "bomb.png: image too large" in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
