"""Photos made in the tests: every format encoded for real, phone-sized JPEGs, hand-written JPEG bombs."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

import app.core.imaging  # noqa: F401  # registers the HEIF plugin, as the loader does
from app.core.settings import DEFAULT_FORMATS

Image.MAX_IMAGE_PIXELS = None  # the generators below make images larger than Pillow's own guard

# Save options for every format the loader accepts by default (fast encoders, real files).
SAVE = {
    "JPEG": {"quality": 90},
    "PNG": {"compress_level": 1},
    "WEBP": {"quality": 90},
    "BMP": {},
    "GIF": {},
    "TIFF": {"compression": "tiff_lzw"},
    "HEIF": {"quality": 90, "enc_params": {"preset": "ultrafast"}},
    "AVIF": {"quality": 90, "speed": 10},
}
assert set(SAVE) == set(DEFAULT_FORMATS), "a default format without an encoder case"


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **{**SAVE.get(fmt, {}), **kw})
    return buf.getvalue()


def textured(src: Image.Image, size: tuple[int, int], *, amplitude: int = 12, seed: int = 0) -> Image.Image:
    """``src`` upscaled to ``size`` with sensor-like noise added, so it does not compress like a smooth upscale.

    Built in strips of rows (one noise tile reused), so the peak is the output image plus one strip.
    """
    src = src.convert("RGB")
    width, height = size
    out = Image.new("RGB", size)
    rng = np.random.default_rng(seed)
    rows = 256
    tile = rng.integers(-amplitude, amplitude + 1, (rows, width, 3), dtype=np.int16)
    sy = src.height / height
    for y in range(0, height, rows):
        h = min(rows, height - y)
        strip = src.resize((width, h), Image.Resampling.BILINEAR, box=(0, y * sy, src.width, (y + h) * sy))
        arr = np.asarray(strip, dtype=np.int16) + np.roll(tile[:h], (y // rows) * 37, axis=1)
        out.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), (0, y))
    return out


def phone_jpeg(photo: Path, size: tuple[int, int], path: Path, *, seed: int = 0, **save: object) -> Path:
    """A phone-sized, textured JPEG made from a real photo, written to ``path``."""
    with Image.open(photo) as src:
        big = textured(src, size, seed=seed)
    big.save(path, format="JPEG", **{"quality": 90, **save})
    return path


# --- JPEGs written by hand -------------------------------------------------------------------------
def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def flat_jpeg(width: int, height: int, *, interleaved: bool = True, components: int = 3) -> bytes:
    """A valid JPEG of a flat grey picture, 2 bits a block, so a huge one is small on the wire.

    One Huffman table per class with a single 1-bit code: DC category 0, AC end-of-block; every
    8x8 block is "0" + "0", so the entropy-coded data is all zero bytes. ``interleaved=False``
    writes one scan per component (baseline SOF0 all the same): libjpeg then buffers every DCT
    coefficient of the image (2 bytes a sample) whatever the output scale.
    """
    dqt = _segment(0xDB, b"\x00" + bytes([1] * 64))
    ids = range(1, components + 1)
    sof = _segment(0xC0, struct.pack(">BHHB", 8, height, width, components) + b"".join(bytes([c, 0x11, 0]) for c in ids))
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1 for symbol 0x00
    dht = _segment(0xC4, b"\x00" + one_code + b"\x10" + one_code)
    blocks = -(-width // 8) * -(-height // 8)

    def scan(comps: list[int]) -> bytes:
        header = _segment(0xDA, bytes([len(comps)]) + b"".join(bytes([c, 0x00]) for c in comps) + b"\x00\x3f\x00")
        return header + bytes(-(-blocks * len(comps) * 2 // 8))

    scans = scan(list(ids)) if interleaved else b"".join(scan([c]) for c in ids)
    return b"\xff\xd8" + dqt + sof + dht + scans + b"\xff\xd9"
