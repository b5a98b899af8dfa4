"""The one image loader: formats sniffed, modes converted, EXIF applied, limits enforced."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.errors import EmptyInput, ImageDecodeError, ImageTooLarge, UnsupportedFormat
from app.imaging import load_image
from tests.helpers import image_bytes


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_output_is_uint8_rgb_at_size() -> None:
    out = load_image(image_bytes((10, 200, 30), size=(300, 120)), 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3) and out.flags.c_contiguous
    assert tuple(out.reshape(-1, 3).mean(axis=0).round()) == pytest.approx((10, 200, 30), abs=8)


def test_path_and_bytes_give_the_same_array(tmp_path) -> None:
    data = image_bytes(fmt="JPEG", size=(500, 400))
    (tmp_path / "x.jpg").write_bytes(data)
    np.testing.assert_array_equal(load_image(tmp_path / "x.jpg", 100), load_image(data, 100))


def test_format_is_sniffed_not_taken_from_the_name(tmp_path) -> None:
    png = image_bytes(fmt="PNG")
    (tmp_path / "photo.jpg").write_bytes(png)  # wrong extension
    np.testing.assert_array_equal(load_image(tmp_path / "photo.jpg", 32), load_image(png, 32))
    (tmp_path / "notes.png").write_bytes(b"just text, not an image")
    with pytest.raises(UnsupportedFormat, match="not a recognised image"):
        load_image(tmp_path / "notes.png", 32)


def test_disallowed_format_is_refused() -> None:
    with pytest.raises(UnsupportedFormat, match="BMP is not allowed"):
        load_image(image_bytes(fmt="BMP"), 32, formats=("JPEG", "PNG"))


def test_empty_input() -> None:
    with pytest.raises(EmptyInput):
        load_image(b"", 32)


def test_truncated_jpeg_is_a_decode_error() -> None:
    data = image_bytes(fmt="JPEG", size=(200, 200))
    with pytest.raises(ImageDecodeError):
        load_image(data[: len(data) // 3], 32)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = image_bytes(size=(300, 200))
    assert load_image(data, 32, max_pixels=60_000).shape == (32, 32, 3)
    with pytest.raises(ImageTooLarge, match="60000 pixels, over the limit of 59999"):
        load_image(data, 32, max_pixels=59_999)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    base = Image.new("RGB", (40, 30), (120, 60, 200))
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (40, 30), 30000 if mode == "I;16" else 120)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    out = load_image(encode(img, fmt), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    img = Image.new("I;16", (8, 8), 32768)
    out = load_image(encode(img, "PNG"), 8)
    assert 120 <= int(out.mean()) <= 135


def test_transparency_is_composited_on_white() -> None:
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    out = load_image(encode(img, "PNG"), 8)
    assert (out == 255).all()


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    upright = Image.fromarray(arr)
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored rotated...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90° clockwise to view" (undoes the 90° counter-clockwise)
    got = load_image(encode(rotated, "PNG", exif=exif.tobytes()), 20, resample="nearest")
    want = load_image(encode(upright, "PNG"), 20, resample="nearest")
    np.testing.assert_array_equal(got, want)


def test_large_jpeg_uses_draft_mode_and_matches_shape() -> None:
    data = image_bytes(fmt="JPEG", size=(3000, 2000), noise=0)
    out = load_image(data, 224)
    assert out.shape == (224, 224, 3)
    assert tuple(out.reshape(-1, 3).mean(axis=0).round()) == pytest.approx((200, 30, 30), abs=6)


def test_only_first_frame_of_animation_is_used() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue(), 8)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50


@pytest.mark.parametrize("resample", ["nearest", "bilinear", "bicubic", "lanczos", "box"])
def test_resample_filters(resample: str) -> None:
    assert load_image(image_bytes(size=(64, 48)), 24, resample=resample).shape == (24, 24, 3)
