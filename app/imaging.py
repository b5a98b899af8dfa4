"""The one image loader: training, evaluation and serving all call :func:`load_image`.

Bytes (or a path) in, ``uint8 [size, size, 3]`` RGB out:

1. the format is sniffed from the bytes (never the file name or content type) and must be allowed;
2. the declared pixel count is checked against ``max_pixels`` *before* decoding (bomb guard);
3. JPEGs are decoded in draft mode (DCT scaling to the smallest size >= the target): the
   single biggest saving for large photos;
4. only the first frame of animated/multi-page files is decoded;
5. EXIF orientation is applied, so a rotated phone photo equals its upright version;
6. every mode becomes RGB: 16-bit and float greyscale are scaled to 8 bits, transparency is
   composited on white, CMYK/palette/LA are converted;
7. the image is resized (squashed, like Keras ``load_img``) to ``size x size`` with ``resample``
   (``bilinear`` by default; Pillow's bilinear is area-aware when shrinking).

Only :class:`~app.errors.InputError` subclasses escape: ``EmptyInput``, ``UnsupportedFormat``,
``ImageTooLarge``, ``ImageDecodeError``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import EmptyInput, ImageDecodeError, ImageTooLarge, UnsupportedFormat
from app.settings import DEFAULT_FORMATS

# Our own ``max_pixels`` check replaces Pillow's global bomb guard (which warns, then raises
# at 2x): it is explicit, configurable and raises our documented exception.
Image.MAX_IMAGE_PIXELS = None

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
DEFAULT_MAX_PIXELS = 40_000_000


def load_image(
    source: bytes | bytearray | memoryview | str | Path,
    size: int,
    *,
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Iterable[str] = DEFAULT_FORMATS,
) -> np.ndarray:
    """Decode ``source`` into a ``uint8 [size, size, 3]`` RGB array (see the module docstring)."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    if not data:
        raise EmptyInput("empty image: 0 bytes")
    allowed = {f.upper() for f in formats}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings (truncated EXIF, palette…) are not errors here
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise UnsupportedFormat(f"not a recognised image (allowed formats: {', '.join(sorted(allowed))})") from None
        except Exception as exc:  # noqa: BLE001 - a header Pillow cannot parse is bad input
            raise ImageDecodeError(f"cannot read image header: {type(exc).__name__}") from None
        with img:
            if img.format not in allowed:
                raise UnsupportedFormat(
                    f"image format {img.format} is not allowed (allowed formats: {', '.join(sorted(allowed))})"
                )
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (max_image_pixels)"
                )
            try:
                return _decode(img, size, RESAMPLE[resample])
            except (EmptyInput, UnsupportedFormat, ImageTooLarge, ImageDecodeError):
                raise
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any kind
                raise ImageDecodeError(f"cannot decode {img.format} image: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).split("\n")[0][:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode(img: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    if img.format == "JPEG":
        img.draft("RGB" if img.mode == "RGB" else None, (size, size))
    img.load()  # first frame only
    img = ImageOps.exif_transpose(img) or img
    img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), resample)
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_image_file(path: Path) -> bool:
    """Cheap filter for dataset walks: hidden files and obvious non-files are skipped, the rest tried."""
    return path.is_file() and not path.name.startswith(".")
