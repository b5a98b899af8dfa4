"""The one image loader: formats sniffed, modes converted, EXIF applied, limits enforced."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from app.core.errors import EmptyInput, ImageDecodeError, ImageTooLarge, UnsupportedFormat
from app.core.imaging import JPEG_WORK_MEMORY_BYTES, JpegLayout, jpeg_layout, load_image
from app.core.settings import DEFAULT_FORMATS, DEFAULT_MAX_IMAGE_PIXELS
from tests import photos
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


# --- every accepted format, encoded for real ---------------------------------------------------
def colour_photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), (30, 160, 220), np.uint8))


@pytest.mark.parametrize("fmt", DEFAULT_FORMATS)
def test_every_default_format_decodes_from_a_real_file(fmt: str) -> None:
    data = photos.encode(colour_photo(), fmt)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt  # sniffed as that format
    out = load_image(data, 32)
    assert out.shape == (32, 32, 3)
    assert tuple(out.reshape(-1, 3).mean(axis=0)) == pytest.approx((30, 160, 220), abs=6)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_are_sniffed_not_named(fmt: str, tmp_path) -> None:
    data = photos.encode(colour_photo(), fmt)
    (tmp_path / "photo.jpg").write_bytes(data)
    np.testing.assert_array_equal(load_image(tmp_path / "photo.jpg", 16), load_image(data, 16))
    with pytest.raises(UnsupportedFormat, match=f"{fmt} is not allowed"):
        load_image(data, 16, formats=("JPEG", "PNG"))


def halves(width: int = 80, height: int = 40) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)  # left half red, right half blue
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_exif_orientation_is_applied_in_every_format_that_carries_it(fmt: str) -> None:
    upright = halves()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and "rotate 90° clockwise to view"
    got = load_image(photos.encode(stored, fmt, exif=exif.tobytes()), 20)
    want = load_image(photos.encode(upright, fmt), 20)
    assert np.abs(got.astype(int) - want.astype(int)).max() < 40  # lossy codecs; a wrong rotation is off by 255
    assert got[10, 2, 0] > 200 and got[10, 17, 2] > 200  # red on the left, blue on the right


def test_heif_and_avif_animations_use_the_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("AVIF",):  # pillow-heif writes HEIF image collections, not sequences; AVIF sequences are real
        out = load_image(photos.encode(frames[0], fmt, save_all=True, append_images=frames[1:]), 8)
        assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


# --- what is decoded is what is bounded --------------------------------------------------------
def test_baseline_jpeg_is_bounded_by_its_reduced_decode() -> None:
    data = image_bytes(fmt="JPEG", size=(3600, 2400), noise=0)  # 8.64 M pixels declared
    # draft mode decodes it at 1/8 scale for a 224 target: 450 x 300 = 135,000 pixels
    assert load_image(data, 224, max_pixels=135_000).shape == (224, 224, 3)
    with pytest.raises(
        ImageTooLarge, match=r"3600x2400 decodes at 1/8 scale to 450x300 = 135000 pixels, over the limit of 134999"
    ):
        load_image(data, 224, max_pixels=134_999)
    # a larger target needs a larger decode: 1/4 scale for 400 pixels
    with pytest.raises(ImageTooLarge, match="1/4 scale to 900x600"):
        load_image(data, 400, max_pixels=135_000)


def test_progressive_jpeg_is_bounded_by_its_declared_size() -> None:
    data = image_bytes(fmt="JPEG", size=(2400, 1600), noise=0, progressive=True)
    with pytest.raises(ImageTooLarge, match="progressive JPEG of 2400x1600 = 3840000 pixels is decoded at full size"):
        load_image(data, 224, max_pixels=60_000)
    assert load_image(data, 224, max_pixels=3_840_000).shape == (224, 224, 3)


def test_multi_scan_baseline_jpeg_bomb_is_refused_before_decoding() -> None:
    """3 MB on the wire, 16384 x 16384, one scan per component: libjpeg would buffer 1.6 GB of coefficients."""
    bomb = photos.flat_jpeg(16384, 16384, interleaved=False)
    assert len(bomb) < 4_000_000 and jpeg_layout(bomb).first_scan_components == 1
    with pytest.raises(ImageTooLarge, match="multi-scan JPEG of 16384x16384 = 268435456 pixels is decoded at full size"):
        load_image(bomb, 224)
    # the same picture in one interleaved scan decodes row by row at 1/8 scale: accepted
    flat = photos.flat_jpeg(16384, 16384)
    assert jpeg_layout(flat).single_pass
    assert (load_image(flat, 224) == 128).all()


def test_libjpeg_memory_is_capped_even_past_the_header_check() -> None:
    """The backstop: libjpeg itself refuses a coefficient buffer over JPEGMEM (set by app.core.imaging)."""
    assert os.environ["JPEGMEM"] == f"{JPEG_WORK_MEMORY_BYTES // 1_000_000}M"
    small = Image.open(io.BytesIO(photos.flat_jpeg(64, 64, interleaved=False)))
    small.load()  # multi-scan decoding itself works
    img = Image.open(io.BytesIO(photos.flat_jpeg(16384, 16384, interleaved=False)))
    img.draft("RGB", (224, 224))
    with pytest.raises(OSError, match="broken data stream"):
        img.load()  # 16384 * 16384 * 3 * 2 bytes = 1.6 GB of coefficients > JPEGMEM


def test_jpeg_layout_reads_the_frame_and_the_first_scan() -> None:
    assert jpeg_layout(image_bytes(fmt="JPEG")) == JpegLayout(0xC0, 3, 3)
    assert jpeg_layout(image_bytes(fmt="JPEG", progressive=True)).sof == 0xC2
    assert jpeg_layout(encode(Image.new("L", (16, 16)), "JPEG")) == JpegLayout(0xC0, 1, 1)
    # with an EXIF block (which may hold a thumbnail JPEG of its own) before the frame
    exif = Image.Exif()
    exif[0x010F] = "phone"
    assert jpeg_layout(image_bytes(fmt="JPEG", exif=exif.tobytes())).single_pass
    # anything unexpected is not single-pass: the declared size limit applies
    for broken in (b"\xff\xd8", b"\xff\xd8junk" + image_bytes(fmt="JPEG")[2:], image_bytes(fmt="JPEG")[:200]):
        assert not jpeg_layout(broken).single_pass


def test_declared_size_limit_lets_a_48_megapixel_photo_through() -> None:
    """8064 x 6048 (48.8 MP, an iPhone's full-resolution HEIC) is under the default; 50 MP + 1 row is not."""
    assert 8064 * 6048 <= DEFAULT_MAX_IMAGE_PIXELS < 8064 * 6201
    assert load_image(png_of_zeros(8064, 6048), 32).shape == (32, 32, 3)
    with pytest.raises(ImageTooLarge, match="8064x6201 = 50004864 pixels, over the limit of 50000000"):
        load_image(png_of_zeros(8064, 6201), 32)


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid greyscale PNG of zeros, compressed row by row (fast for any size)."""
    row = bytes(width + 1)
    comp = zlib.compressobj(1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- the input buffer is read in place ----------------------------------------------------------
@pytest.mark.parametrize("fmt", DEFAULT_FORMATS)
def test_bytearray_and_memoryview_give_the_same_array_as_bytes(fmt: str) -> None:
    data = photos.encode(halves(), fmt)
    want = load_image(data, 24)
    framed = bytearray(b"--boundary\r\n" + data + b"\r\n--boundary--")
    view = memoryview(framed)[12 : 12 + len(data)]
    np.testing.assert_array_equal(load_image(bytearray(data), 24), want)
    np.testing.assert_array_equal(load_image(view, 24), want)


def test_a_large_body_is_not_copied_to_be_decoded() -> None:
    """tracemalloc sees Python's allocations: the old ``bytes(source)`` copy of a 12 MB body shows as 12 MB."""
    body = bytearray(image_bytes(fmt="JPEG", size=(4000, 3000), noise=60, quality=95))
    assert len(body) > 10_000_000
    tracemalloc.start()
    try:
        load_image(body, 224)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"{peak} bytes allocated by Python while decoding a {len(body)}-byte buffer"


def test_alpha_is_composited_on_white_at_partial_opacity() -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 128))  # half-transparent black over white: mid grey
    out = load_image(encode(img, "PNG"), 8)
    assert np.abs(out.astype(int) - 127).max() <= 1
