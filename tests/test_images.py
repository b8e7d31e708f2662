"""Decoding: EXIF orientation, every odd mode to RGB, corrupt / empty / oversized files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catdog_glm.errors import ImageError
from catdog_glm.vision.images import open_image, to_rgb
from tests.conftest import save_image


def test_exif_orientation_is_honoured(tmp_path):
    # A 60x40 landscape image whose EXIF says "rotate 90° CW to display": it must come out 40x60.
    img = Image.new("RGB", (60, 40), (10, 200, 10))
    img.paste((250, 0, 0), (0, 0, 10, 10))  # a red mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = open_image(path)
    assert out.size == (40, 60)
    r, g, b = out.getpixel((35, 4))  # the mark moved to the top-right after the rotation
    assert r > 200 and g < 60


@pytest.mark.parametrize(
    ("mode", "color"),
    [
        ("L", 128),
        ("P", 3),
        ("RGBA", (255, 0, 0, 255)),
        ("LA", (100, 255)),
        ("CMYK", (0, 255, 255, 0)),
        ("I;16", 65535),
        ("1", 1),
        ("YCbCr", (120, 100, 140)),
    ],
)
def test_every_mode_becomes_rgb(mode, color):
    assert to_rgb(Image.new(mode, (8, 8), color)).mode == "RGB"


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # about half of 65535
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    value = open_image(path).getpixel((0, 0))
    assert value[0] == pytest.approx(128, abs=1)  # convert() alone would clip this to 255


def test_transparent_pixels_go_on_white(tmp_path):
    path = save_image(tmp_path / "clear.png", mode="RGBA", color=(0, 0, 0, 0))
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    path = save_image(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    r, g, b = open_image(path).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    r, g, b = open_image(path).getpixel((8, 8))
    assert r > 200 and b < 60


def test_webp(tmp_path):
    path = save_image(tmp_path / "x.webp", color=(0, 0, 255), fmt="WEBP")
    assert open_image(path).getpixel((2, 2))[2] > 200


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image", "not an image"),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "fake.png"),
    ],
)
def test_unreadable_files_raise_image_error(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        open_image(path)


def test_truncated_jpeg(tmp_path):
    good = save_image(tmp_path / "good.jpg", size=(200, 200))
    data = good.read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        open_image(bad)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = save_image(tmp_path / "big.png", size=(300, 300))
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path, max_pixels=300 * 299)


def test_jpeg_draft_keeps_at_least_the_requested_size(tmp_path):
    path = save_image(tmp_path / "large.jpg", size=(1200, 900))
    out = open_image(path, draft_size=256)
    assert min(out.size) >= 256 and out.size[0] < 1200  # decoded at a reduced scale, never below 256
