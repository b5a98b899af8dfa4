"""The one image loader: training, evaluation and serving all call :func:`load_image`.

Bytes (or a path) in, ``uint8 [size, size, 3]`` RGB out:

1. the format is sniffed from the bytes (never the file name or content type) and must be allowed
   (JPEG, PNG, WebP, BMP, GIF, TIFF, HEIF/HEIC, AVIF by default): ``Image.open`` is handed only the
   allowed formats' plugins, so no other parser ever reads the bytes;
2. what will be **decoded** is bounded by ``max_pixels`` *before* any pixel is decoded (bomb guard),
   and so is the memory it takes (:func:`decode_cost`): the peak bytes a pixel of the decode and of the
   conversion to RGB, for the image's format and mode, times its pixels, must fit the budget of
   ``max_pixels`` x :data:`BUDGET_BYTES_PER_PIXEL` (500 MB at the default limit), so an RGB photo
   may use the whole pixel limit and a transparent greyscale PNG or a WebP fewer pixels;

   - a sequential (baseline) JPEG is decoded in draft mode: libjpeg scales the DCT by 1/2, 1/4 or
     1/8 to the smallest size >= the target, so a 200 MP phone photo (16320 x 12240) decodes to
     2040 x 1530 and costs ~15 MB; the limit applies to that reduced size;
   - a progressive, lossless or multi-scan JPEG keeps every DCT coefficient of the full image in
     memory while it decodes (2 bytes per sample, ~600 MB for 200 MP), and the other formats have
     no reduced decoding at all: for those the limit applies to the declared size;
   - libjpeg's own working memory is also capped per decode (``JPEGMEM``, see below), a backstop
     for anything the header check above misreads;
3. only the first frame of animated/multi-page files is decoded;
4. EXIF orientation is applied, so a rotated phone photo equals its upright version (HEIF's own
   ``irot``/``imir`` transforms are applied by libheif, which then reports orientation 1);
5. every mode becomes RGB: 16-bit and float greyscale are scaled to 8 bits (a band of rows at a
   time, into an 8-bit greyscale image), transparency is composited on white, CMYK/palette/LA are
   converted; a greyscale image is resized before it becomes RGB (the same pixels, a quarter of the memory);
6. the image is resized (squashed, like Keras ``load_img``) to ``size x size`` with ``resample``
   (``bilinear`` by default; Pillow's bilinear is area-aware when shrinking).

The input buffer is never copied whole: ``bytes`` are read in place, a ``bytearray`` or
``memoryview`` (a request body, a multipart part) through a small reader. WebP, HEIF, AVIF and
libtiff decoders read the whole file into one ``bytes`` of their own while they decode.

Only :class:`~app.core.errors.InputError` subclasses escape: ``EmptyInput``, ``UnsupportedFormat``,
``ImageTooLarge``, ``ImageDecodeError``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from app.core.errors import EmptyInput, ImageDecodeError, ImageTooLarge, UnsupportedFormat
from app.core.settings import DEFAULT_FORMATS, DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from app.core.settings import Settings

# Our own ``max_pixels`` check replaces Pillow's global bomb guard (which warns, then raises
# at 2x): it is explicit, configurable and raises our documented exception.
Image.MAX_IMAGE_PIXELS = None
# HEIF/HEIC (format "HEIF") through libheif; AVIF is Pillow's own plugin. Thumbnails are not read.
pillow_heif.register_heif_opener(thumbnails=False)

# libjpeg-turbo's cap on its own memory per decompression (it reads JPEGMEM at each decode; the
# value is in bytes, "M" = 10^6). It only matters when the header check is bypassed: a full-buffer
# JPEG within ``max_pixels`` needs at most 8 bytes a pixel (4 components, 2 bytes a coefficient).
# Set here for the default limit, and again by :func:`configure` for the configured one (the service
# and training call it before any decode thread exists); an operator's own JPEGMEM wins.
_OPERATOR_JPEGMEM = os.environ.get("JPEGMEM")


def jpeg_work_memory(max_pixels: int) -> int:
    """libjpeg's memory cap for one decode within ``max_pixels`` (bytes)."""
    return 8 * max_pixels + 64 * 1_000_000


JPEG_WORK_MEMORY_BYTES = jpeg_work_memory(DEFAULT_MAX_IMAGE_PIXELS)


def configure(max_pixels: int) -> None:
    """Set ``JPEGMEM`` for ``max_pixels`` (``max_image_pixels``), unless the operator set JPEGMEM. Call it
    before decode threads start: the environment is not safe to change while another thread reads it."""
    if _OPERATOR_JPEGMEM is None:
        os.environ["JPEGMEM"] = f"{-(-jpeg_work_memory(max_pixels) // 1_000_000)}M"


configure(DEFAULT_MAX_IMAGE_PIXELS)

BUDGET_BYTES_PER_PIXEL = 10
"""Decode memory per image: ``max_pixels`` x this many bytes (500 MB at the default limit), whatever the
format and mode (:func:`decode_cost`); a request's images are decoded ``decode_threads`` at a time, so
decoding holds at most that many budgets. An RGB JPEG, PNG, TIFF, BMP or HEIC, an RGBA PNG and a float
TIFF fit at the full pixel limit; a transparent greyscale PNG or a WebP (libwebp decodes through an
RGBA canvas and a copy) get fewer pixels."""
SLACK_BYTES_PER_PIXEL = 1
"""Added to every estimate: allocator and buffer overhead, measured at 0.1-0.3 bytes a pixel."""
MODE_COST: dict[str, tuple[int, int]] = {
    # mode: (bytes a pixel of Pillow's decoded image, bytes a pixel more while it becomes RGB at full size)
    "1": (1, 4), "L": (1, 0), "P": (1, 4), "RGB": (4, 0), "RGBA": (4, 4), "RGBX": (4, 4), "CMYK": (4, 4),
    "YCbCr": (4, 4), "LAB": (4, 4), "HSV": (4, 4), "RGBa": (4, 8), "LA": (4, 8), "La": (4, 8), "PA": (4, 8),
    "I;16": (2, 1), "I;16B": (2, 1), "I;16L": (2, 1), "I;16N": (2, 1), "I": (4, 1), "F": (4, 1),
}  # fmt: skip
"""Peak memory of each mode's decoded image and its conversion in :func:`_to_rgb` (a greyscale result
is resized before it becomes RGB, so it adds nothing at full size). A mode not listed costs 4 + 8."""
UNKNOWN_MODE_COST = (4, 8)
TRANSPARENT_PALETTE_EXTRA = 8  # P with transparency: an RGBA copy, then the RGB result
DECODER_COST: dict[str, int] = {"WEBP": 12, "HEIF": 4, "AVIF": 5}
"""Bytes a pixel a decoder holds of its own beside Pillow's image while it decodes (libheif and libavif
decode into a buffer that is then copied; Pillow's WebP decoder goes through libwebp's RGBA canvas and
more: measured at 16 bytes a pixel in all). TIFF's is the raw size of the image's pixels (a
single-strip or single-tile TIFF is decoded through one buffer that size); a progressive or
multi-scan JPEG's is its coefficient buffer, 2 bytes a sample of its full size; PNG, GIF, BMP and a
sequential JPEG decode row by row."""

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
Buffer = bytes | bytearray | memoryview

# JPEG start-of-frame markers by coding process (ITU T.81 table B.1); DHT (C4), JPG (C8), DAC (CC) are not SOFs.
SOF_SEQUENTIAL = frozenset({0xC0, 0xC1, 0xC9})  # baseline, extended (Huffman or arithmetic): one pass, scalable
SOF_PROGRESSIVE = frozenset({0xC2, 0xCA})  # scalable, but every coefficient is buffered
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def load_image(
    source: Buffer | str | Path,
    size: int,
    *,
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    formats: Iterable[str] = DEFAULT_FORMATS,
) -> np.ndarray:
    """Decode ``source`` into a ``uint8 [size, size, 3]`` RGB array (see the module docstring)."""
    data: Buffer = Path(source).read_bytes() if isinstance(source, str | Path) else source
    if not len(data):
        raise EmptyInput("empty image: 0 bytes")
    allowed = {f.upper() for f in formats}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings (truncated EXIF, palette…) are not errors here
        try:
            img = open_image(_reader(data), allowed)
        except UnidentifiedImageError:
            raise UnsupportedFormat(_unrecognised(data, allowed)) from None
        except UnsupportedFormat:
            raise
        except Exception as exc:  # noqa: BLE001 - a header Pillow cannot parse is bad input
            raise ImageDecodeError(f"cannot read image header: {type(exc).__name__}") from None
        with img:
            if img.format not in allowed:  # a plugin that reports another format than its own (never expected)
                raise UnsupportedFormat(
                    f"image format {img.format} is not allowed (allowed formats: {', '.join(sorted(allowed))})"
                )
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels ({width}x{height})")
            _bound_decode(img, data, size, max_pixels)
            try:
                return _decode(img, size, RESAMPLE[resample])
            except (EmptyInput, UnsupportedFormat, ImageTooLarge, ImageDecodeError):
                raise
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any kind
                raise ImageDecodeError(f"cannot decode {img.format} image: {_reason(exc)}") from None


@dataclass(frozen=True)
class DecodeLimits:
    """The limits every decode runs under, turned from the settings into :func:`load_image` arguments in this
    one place (:meth:`from_settings`): the pixel limit (``max_image_pixels``) and the allowed formats
    (``allowed_formats``). Picklable: a Ray decode task receives it."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    formats: tuple[str, ...] = tuple(sorted(DEFAULT_FORMATS))

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(settings.max_image_pixels, tuple(sorted(settings.formats)))

    def load(self, source: Buffer | str | Path, size: int, resample: str) -> np.ndarray:
        """:func:`load_image` of ``source`` within these limits."""
        return load_image(source, size, resample=resample, max_pixels=self.max_pixels, formats=self.formats)


DEFAULT_LIMITS = DecodeLimits()
"""The settings' defaults (a caller without settings: tests, benchmarks)."""


def open_image(fp: BinaryIO | Path, allowed: Iterable[str]) -> Image.Image:
    """``Image.open`` trying only the plugins of the ``allowed`` formats (no other parser reads the bytes)."""
    Image.init()
    plugins = sorted(f for f in {a.upper() for a in allowed} if f in Image.OPEN)
    if not plugins:
        raise UnsupportedFormat(f"no image format it can read is allowed (allowed formats: {', '.join(sorted(allowed))})")
    return Image.open(fp, formats=plugins)


def _unrecognised(data: Buffer, allowed: set[str]) -> str:
    """Why bytes no allowed plugin opened were refused: the format named by the plugins' own signature
    checks (prefix comparisons only: no other plugin parses anything), else "not a recognised image"."""
    prefix = bytes(memoryview(data)[:16])
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if fmt not in allowed and accept is not None:
            try:
                if accept(prefix):
                    return f"image format {fmt} is not allowed (allowed formats: {', '.join(sorted(allowed))})"
            except Exception:  # noqa: BLE001, S112 - a signature check that fails is no match
                continue
    return f"not a recognised image (allowed formats: {', '.join(sorted(allowed))})"


def decode_cost(img: Image.Image) -> int:
    """Peak bytes a (decoded) pixel of decoding ``img`` (its format and mode) and making it RGB; a JPEG's
    coefficient buffer, which follows its full size rather than the decoded one, is :func:`_jpeg_bytes`'s."""
    decoded, extra = MODE_COST.get(img.mode, UNKNOWN_MODE_COST)
    if img.mode == "P" and "transparency" in img.info:
        extra = TRANSPARENT_PALETTE_EXTRA
    own = decoded if img.format == "TIFF" else DECODER_COST.get(img.format or "", 0)
    return decoded + max(own, extra) + SLACK_BYTES_PER_PIXEL


def _check_budget(img: Image.Image, pixels: int, max_pixels: int, coefficients: int = 0) -> None:
    """Refuse ``img`` when decoding its ``pixels`` (plus a JPEG's ``coefficients`` buffer, bytes) would take
    more than the decode budget."""
    cost = decode_cost(img)
    need, budget = pixels * cost + coefficients, max_pixels * BUDGET_BYTES_PER_PIXEL
    if need > budget:
        buffer = f" and a {coefficients}-byte coefficient buffer" if coefficients else ""
        raise ImageTooLarge(
            f"{img.format} image of mode {img.mode}: {pixels} pixels at ~{cost} bytes a pixel{buffer} take {need} bytes "
            f"to decode, over the decode budget of {budget} bytes ({BUDGET_BYTES_PER_PIXEL} bytes a pixel of "
            f"max_image_pixels={max_pixels})"
        )


def _bound_decode(img: Image.Image, data: Buffer, size: int, max_pixels: int) -> None:
    """Refuse what would decode to more than ``max_pixels``, or take more than the decode budget;
    set up JPEG draft decoding when it is safe."""
    width, height = img.size
    if img.format == "JPEG":
        layout = jpeg_layout(data)
        if layout.scalable:
            img.draft("RGB" if img.mode == "RGB" else None, (size, size))
        if layout.single_pass:
            w, h = img.size  # the reduced size: draft() only configured the decoder
            if w * h > max_pixels:
                raise ImageTooLarge(
                    f"JPEG of {width}x{height} decodes at 1/{width // w} scale to {w}x{h} = {w * h} pixels, "
                    f"over the limit of {max_pixels} (max_image_pixels)"
                )
            _check_budget(img, w * h, max_pixels)
            return
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{layout.kind} JPEG of {width}x{height} = {width * height} pixels is decoded at full size, "
                f"over the limit of {max_pixels} (max_image_pixels)"
            )
        w, h = img.size  # reduced by draft() when scalable; every coefficient is kept at full size
        _check_budget(img, w * h, max_pixels, coefficients=2 * max(layout.components, 1) * width * height)
        return
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (max_image_pixels)"
        )
    _check_budget(img, width * height, max_pixels)


@dataclass(frozen=True)
class JpegLayout:
    """What a JPEG's marker segments before its first scan say about how libjpeg will decode it."""

    sof: int | None  # the start-of-frame marker (0xC0 baseline, 0xC2 progressive, …), None if not found
    components: int  # in the frame
    first_scan_components: int  # in the first scan; fewer than ``components`` = non-interleaved, multi-scan

    @property
    def scalable(self) -> bool:
        """DCT-based, so libjpeg can decode it at 1/2, 1/4 or 1/8 scale."""
        return self.sof in SOF_SEQUENTIAL or self.sof in SOF_PROGRESSIVE

    @property
    def single_pass(self) -> bool:
        """Decoded row by row: memory follows the reduced output, not the full image."""
        return self.sof in SOF_SEQUENTIAL and 0 < self.first_scan_components == self.components

    @property
    def kind(self) -> str:
        if self.sof in SOF_PROGRESSIVE:
            return "progressive"
        if self.sof in SOF_SEQUENTIAL and self.first_scan_components:
            return "multi-scan"
        return "non-sequential" if self.sof is not None else "unrecognised"


def jpeg_layout(data: Buffer) -> JpegLayout:
    """Walk the marker segments from SOI to the first SOS, as libjpeg reads them.

    Anything unexpected (bytes between segments, a segment running past the end, no SOS) gives a
    layout that is not ``single_pass``, so the caller falls back to the full-size limit.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes | bytearray) else data
    n, i = len(view), 2
    sof, components = None, 0
    while i + 4 <= n:
        if view[i] != 0xFF:
            break  # junk between segments: libjpeg would skip it with a warning; we do not guess
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker == 0xD9:  # EOI before any scan
            break
        length = view[i + 2] << 8 | view[i + 3]
        if length < 2 or i + 2 + length > n:
            break
        if marker in SOF_MARKERS and length >= 8:
            sof, components = marker, view[i + 9]
        elif marker == 0xDA and length >= 3:
            return JpegLayout(sof, components, view[i + 4])
        i += 2 + length
    return JpegLayout(sof, components, 0)


class _ViewReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (``io.BytesIO`` copies anything but ``bytes``)."""

    def __init__(self, data: bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]  # any writable buffer
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _reader(data: Buffer) -> BinaryIO:
    if isinstance(data, bytes):
        return io.BytesIO(data)  # shares the bytes object, no copy
    return io.BufferedReader(_ViewReader(data), buffer_size=64 * 1024)


def _reason(exc: Exception) -> str:
    text = str(exc).split("\n")[0][:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode(img: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    img.load()  # first frame only; a JPEG at the draft scale _bound_decode chose
    ImageOps.exif_transpose(img, in_place=True)  # without in_place, an upright image is copied whole
    img = _to_rgb(img)
    if img.mode == "L":  # greyscale: resized first, then made RGB (the same pixels: RGB repeats the channel)
        if img.size != (size, size):
            img = img.resize((size, size), resample)
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), resample)
    return np.asarray(img, dtype=np.uint8)


BAND_ROWS = 256
"""Rows of a 16-bit or float image scaled to 8 bits at a time (:func:`_to_grey`)."""


def _to_grey(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image scaled to 8 bits (0..65535 for 16-bit and any image
    whose maximum is over 255, else 0..255), a band of :data:`BAND_ROWS` rows at a time: one byte a
    pixel more than the decoded image, never a full-size float copy."""
    width, height = img.size
    extrema = cast("tuple[float, float]", img.getextrema())
    top = 65535.0 if img.mode.startswith("I;16") or extrema[1] > 255 else 255.0
    out = Image.new("L", img.size)
    for y in range(0, height, BAND_ROWS):
        band = np.asarray(img.crop((0, y, width, min(y + BAND_ROWS, height)))).astype(np.float32)
        band *= 255.0 / top
        np.clip(band, 0, 255, out=band)
        out.paste(Image.fromarray(band.astype(np.uint8), "L"), (0, y))
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB at the image's own size, or 8-bit greyscale (``L``, made RGB once resized), with at most one
    full-size copy besides the decoded image (:data:`MODE_COST`)."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_grey(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # composite on white: out = rgb * alpha + white * (1 - alpha)
        return out
    return img.convert("RGB")


def is_image_file(path: Path) -> bool:
    """Cheap filter for dataset walks: hidden files and obvious non-files are skipped, the rest tried."""
    return path.is_file() and not path.name.startswith(".")
