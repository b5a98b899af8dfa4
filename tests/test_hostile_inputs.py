"""Hostile inputs against one real server: every input is generated here, nothing is downloaded.

Each kind gets the documented status with the error model ``{"error": {"code", "message",
"request_id"}}`` (or a 200 whose bad image carries a per-image ``error``), the server stays ready,
the good images sent alongside are still classified, and the server log never shows a traceback.
Decoding details (EXIF orientation, modes) are also checked one level down, on ``load_image``.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.imaging import load_image
from app.storage.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, image_bytes

BODY_LIMIT = 1_000_000
PIXEL_LIMIT = 4_000_000
RED, BLUE = (210, 40, 40), (40, 40, 210)
GOOD_RED = image_bytes(RED, "PNG", seed=101)
GOOD_BLUE = image_bytes(BLUE, "JPEG", seed=102)


# --- generators ---------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_by_hand(width: int, height: int, *, depth: int = 8, color: int = 2, rows: int | None = None, extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk: the IHDR says ``width x height``, the IDAT holds ``rows`` rows of zeros."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    row = b"\x00" + bytes(width * channels * depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_bomb() -> bytes:
    """~10 KB on the wire, 60000 x 60000 declared (3.6 G pixels)."""
    return png_by_hand(60_000, 60_000, rows=8)


def png_zero_bomb() -> bytes:
    """A complete, valid image of zeros just over the pixel limit: 12 MB decoded from ~12 KB."""
    return png_by_hand(2100, 2000)


def png_text_bomb() -> bytes:
    """A zTXt chunk that inflates to 64 MB (Pillow caps text chunks at 1 MB)."""
    payload = zlib.compress(bytes(64 * 1024 * 1024), 9)
    return png_by_hand(8, 8, extra=png_chunk(b"zTXt", b"Comment\x00\x00" + payload))


def png_bad_crc() -> bytes:
    data = bytearray(png_by_hand(16, 16))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def png_zero_width() -> bytes:
    return png_by_hand(0, 16, rows=0)


def png_rgb48() -> bytes:
    """16 bits per channel RGB, hand-written (Pillow cannot write it)."""
    width, height = 24, 20
    rng = np.random.default_rng(5)
    rows = b"".join(b"\x00" + rng.integers(0, 65535, width * 3, dtype=np.uint16).astype(">u2").tobytes() for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def jpeg_bomb() -> bytes:
    """A real JPEG whose SOF0 frame header is patched to 65000 x 65000."""
    data = bytearray(image_bytes(RED, "JPEG", size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def gif_bomb() -> bytes:
    """A real GIF whose logical screen and frame are patched to 65535 x 65535."""
    data = bytearray(image_bytes(RED, "GIF", size=(16, 16)))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    desc = data.index(b"\x2c", 13)
    data[desc + 5 : desc + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def pil_bytes(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def noise(mode: str, size: tuple[int, int] = (40, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32) * 1000)
    if mode == "I":
        return Image.fromarray(rng.integers(-5000, 70000, (h, w), dtype=np.int32))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def many_frames_gif(frames: int = 3000) -> bytes:
    imgs = [noise("RGB", (4, 4), seed=i).convert("P") for i in range(frames)]
    return pil_bytes(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=10)


def many_frames_png(frames: int = 500) -> bytes:
    imgs = [noise("RGB", (8, 8), seed=i) for i in range(frames)]
    return pil_bytes(imgs[0], "PNG", save_all=True, append_images=imgs[1:])


def many_pages_tiff(pages: int = 500) -> bytes:
    imgs = [noise("RGB", (8, 8), seed=i) for i in range(pages)]
    return pil_bytes(imgs[0], "TIFF", save_all=True, append_images=imgs[1:])


def palette_with_transparency() -> bytes:
    img = noise("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return pil_bytes(img, "PNG", transparency=0)


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat.jpg", GOOD_RED)
    return buf.getvalue()


PDF = b"%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n2 0 obj <</Type /Pages /Kids [] /Count 0>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n"
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" fill="red"/></svg>'
HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script><img src=x onerror=alert(1)></body></html>"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
PICKLE = b"\x80\x05\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x05id -a\x94\x85\x94R\x94."


@dataclass(frozen=True)
class ImageKind:
    """One hostile (or odd but valid) image payload and what the service must answer."""

    name: str
    make: Callable[[], bytes]
    status: int
    code: str | None = None  # None: the image is valid and classified

    def payload(self) -> bytes:
        return _payload(self.make)


@functools.cache
def _payload(make: Callable[[], bytes]) -> bytes:
    return make()


IMAGE_KINDS = [
    # not an image / not allowed
    ImageKind("text-as-jpeg", lambda: b"hello, this is plain text\n" * 20, 415, "unsupported_format"),
    ImageKind("html-as-jpeg", lambda: HTML, 415, "unsupported_format"),
    ImageKind("svg-as-jpeg", lambda: SVG, 415, "unsupported_format"),
    ImageKind("pdf-as-jpeg", lambda: PDF, 415, "unsupported_format"),
    ImageKind("zip-as-jpeg", zip_bytes, 415, "unsupported_format"),
    ImageKind("eps-as-jpeg", lambda: EPS, 415, "unsupported_format"),
    ImageKind("pickle-as-jpeg", lambda: PICKLE, 415, "unsupported_format"),
    ImageKind("ppm-not-allowed", lambda: pil_bytes(noise("RGB"), "PPM"), 415, "unsupported_format"),
    ImageKind("ico-not-allowed", lambda: pil_bytes(noise("RGB"), "ICO"), 415, "unsupported_format"),
    # broken
    ImageKind("truncated-jpeg", lambda: truncated(image_bytes(RED, "JPEG", size=(64, 64))), 422, "image_decode_error"),
    ImageKind("truncated-png", lambda: truncated(image_bytes(RED, "PNG", size=(64, 64))), 422, "image_decode_error"),
    ImageKind("truncated-png-header", lambda: image_bytes(RED, "PNG")[:20], 422, "image_decode_error"),
    ImageKind("jpeg-soi-only", lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 422, "image_decode_error"),
    ImageKind("png-bad-crc", png_bad_crc, 415, "unsupported_format"),  # Pillow cannot identify it
    ImageKind("png-zero-width", png_zero_width, 415, "unsupported_format"),
    # bombs
    ImageKind("png-bomb", png_bomb, 422, "image_too_large"),
    ImageKind("png-zero-bomb", png_zero_bomb, 422, "image_too_large"),
    ImageKind("jpeg-bomb", jpeg_bomb, 422, "image_too_large"),
    ImageKind("gif-bomb", gif_bomb, 422, "image_too_large"),
    ImageKind("png-ztxt-bomb", png_text_bomb, 422, "image_decode_error"),
    # within the pixel limit, but over the decode budget (10 bytes a pixel of it) by its mode
    ImageKind(
        "png-la-over-decode-budget", lambda: pil_bytes(Image.new("LA", (2000, 2000), (90, 200)), "PNG"), 422, "image_too_large"
    ),
    ImageKind(
        "tiff-la-deflate-over-decode-budget",
        lambda: pil_bytes(Image.new("LA", (2000, 2000), (90, 200)), "TIFF", compression="tiff_adobe_deflate"),
        422,
        "image_too_large",
    ),
    ImageKind("webp-over-decode-budget", lambda: pil_bytes(Image.new("RGB", (2000, 2000), RED), "WEBP"), 422, "image_too_large"),
    ImageKind(
        "tiff-float-deflate-at-the-limit",
        lambda: pil_bytes(Image.new("F", (2000, 2000), 0.5), "TIFF", compression="tiff_adobe_deflate"),
        200,
    ),
    # odd but valid: classified
    ImageKind("gif-3000-frames", many_frames_gif, 200),
    ImageKind("apng-500-frames", many_frames_png, 200),
    ImageKind("tiff-500-pages", many_pages_tiff, 200),
    ImageKind("png-16bit-grey", lambda: pil_bytes(noise("I;16"), "PNG"), 200),
    ImageKind("png-48bit-rgb", png_rgb48, 200),
    ImageKind("tiff-float32", lambda: pil_bytes(noise("F"), "TIFF"), 200),
    ImageKind("tiff-int32", lambda: pil_bytes(noise("I"), "TIFF"), 200),
    ImageKind("jpeg-cmyk", lambda: pil_bytes(noise("CMYK"), "JPEG"), 200),
    ImageKind("tiff-cmyk", lambda: pil_bytes(noise("CMYK"), "TIFF"), 200),
    ImageKind("png-palette", lambda: pil_bytes(noise("P"), "PNG"), 200),
    ImageKind("png-palette-transparency", palette_with_transparency, 200),
    ImageKind("png-la", lambda: pil_bytes(noise("LA"), "PNG"), 200),
    ImageKind("png-rgba", lambda: pil_bytes(noise("RGBA"), "PNG"), 200),
    ImageKind("png-1bit", lambda: pil_bytes(noise("1"), "PNG"), 200),
    ImageKind("jpeg-grey", lambda: pil_bytes(noise("L"), "JPEG"), 200),
    ImageKind("jpeg-progressive", lambda: image_bytes(RED, "JPEG", size=(300, 200), progressive=True), 200),
    ImageKind("webp-rgba", lambda: pil_bytes(noise("RGBA"), "WEBP"), 200),
    ImageKind("bmp", lambda: pil_bytes(noise("RGB"), "BMP"), 200),
    ImageKind("png-1x1", lambda: image_bytes(RED, "PNG", size=(1, 1)), 200),
    ImageKind("png-1x4000", lambda: image_bytes(RED, "PNG", size=(1, 4000)), 200),
    ImageKind("png-4000x1", lambda: image_bytes(RED, "PNG", size=(4000, 1)), 200),
]


# --- the server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", max_body_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


SECRETS = ("Traceback", 'File "', str(REPO), "/tmp/", "site-packages")


def assert_clean(r: httpx.Response) -> None:
    for s in SECRETS:
        assert s not in r.text, f"{s!r} leaked into the response: {r.text[:300]}"


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "request_id"}, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    assert_clean(r)
    return err


def assert_healthy(server: ServerProcess, client: httpx.Client) -> None:
    assert server.proc is not None and server.proc.poll() is None, "the server died"
    assert client.get("/readyz").status_code == 200
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def multipart(*parts: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in parts]


# --- every image kind, alone and between two good images --------------------------------
@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=lambda k: k.name)
def test_image_kind_alone(kind: ImageKind, server: ServerProcess, client: httpx.Client) -> None:
    r = client.post("/v1/classify", content=kind.payload(), headers={"content-type": "image/jpeg"})
    if kind.code is None:
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["label"] in ("red", "blue") and "error" not in result
    else:
        assert_error(r, kind.status, kind.code)
    assert_healthy(server, client)


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=lambda k: k.name)
def test_image_kind_between_good_images(kind: ImageKind, server: ServerProcess, client: httpx.Client) -> None:
    r = client.post(
        "/v1/classify", files=multipart(("red.png", GOOD_RED), (f"{kind.name}.jpg", kind.payload()), ("blue.jpg", GOOD_BLUE))
    )
    assert r.status_code == 200, r.text
    first, middle, last = r.json()["results"]
    assert (first["label"], last["label"]) == ("red", "blue")
    assert middle["file"] == f"{kind.name}.jpg"
    if kind.code is None:
        assert "error" not in middle and middle["label"] in ("red", "blue")
    else:
        assert middle["error"]["code"] == kind.code and middle["error"]["status"] == kind.status
        assert "label" not in middle
    assert_clean(r)
    assert_healthy(server, client)


def test_jpeg_with_wrong_extension_and_content_type(server: ServerProcess, client: httpx.Client) -> None:
    """The format is sniffed from the bytes: a JPEG named .png / .exe and sent as image/png is a JPEG."""
    r = client.post("/v1/classify", files=multipart(("photo.png", GOOD_BLUE), ("setup.exe", GOOD_RED)))
    assert r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["results"]] == ["blue", "red"]
    r = client.post("/v1/classify", content=GOOD_BLUE, headers={"content-type": "image/png", "x-filename": "cat.gif"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "blue"
    assert_healthy(server, client)


# --- request-level hostility -------------------------------------------------------------
def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * size
        sent += size


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw(content: bytes | Callable[[], Iterator[bytes]], ctype: str = "image/jpeg", **params: str) -> dict[str, Any]:
    return {"content": content, "headers": {"content-type": ctype}, "params": params}


def as_json(doc: object) -> dict[str, Any]:
    return raw(json.dumps(doc).encode(), "application/json")


def with_good(**options: object) -> dict[str, Any]:
    return as_json({"images": [{"b64": _b64(GOOD_RED)}], **options})


@dataclass(frozen=True)
class RequestKind:
    name: str
    request: dict[str, Any]
    status: int
    code: str
    path: str = "/v1/classify"
    method: str = "POST"

    def send(self, client: httpx.Client) -> httpx.Response:
        kwargs = dict(self.request)
        if callable(kwargs.get("content")):  # a fresh generator: httpx sends it chunked, no Content-Length
            kwargs["content"] = kwargs["content"]()
        return client.request(self.method, self.path, **kwargs)


MULTIPART_ZZ = "multipart/form-data; boundary=zz"
REQUEST_KINDS = [
    RequestKind("empty-raw-body", raw(b""), 422, "empty_input"),
    RequestKind("empty-file-part", {"files": multipart(("a.jpg", b""))}, 422, "empty_input"),
    RequestKind("multipart-only-options", {"files": [("top_k", (None, b"1"))]}, 422, "empty_input"),
    RequestKind(
        "multipart-300-files", {"files": multipart(*[(f"{i}.png", GOOD_RED[:64]) for i in range(300)])}, 413, "too_many_images"
    ),
    RequestKind(
        "multipart-300-fields",
        {"data": {f"f{i}": "x" for i in range(300)}, "files": multipart(("a.png", GOOD_RED))},
        413,
        "too_many_images",
    ),
    RequestKind("part-without-file-name", {"files": [("image", (None, GOOD_RED))]}, 422, "malformed_request"),
    RequestKind("multipart-no-boundary", raw(b"--x\r\n\r\n", "multipart/form-data"), 422, "malformed_request"),
    RequestKind("multipart-garbage", raw(b"\x00\xff" * 500, MULTIPART_ZZ), 422, "malformed_request"),
    RequestKind("oversized-announced", raw(b"\0" * (BODY_LIMIT + 1)), 413, "body_too_large"),
    RequestKind("oversized-chunked", raw(lambda: _chunks(8 * BODY_LIMIT)), 413, "body_too_large"),
    RequestKind("oversized-multipart-chunked", raw(lambda: _chunks(3 * BODY_LIMIT), MULTIPART_ZZ), 413, "body_too_large"),
    RequestKind("invalid-base64", as_json({"images": [{"b64": "!!not base64!!"}]}), 422, "malformed_request"),
    RequestKind("b64-not-a-string", as_json({"images": [{"b64": 12345}]}), 422, "malformed_request"),
    RequestKind("json-image-not-object", as_json({"images": ["abc"]}), 422, "malformed_request"),
    RequestKind("json-list", as_json([{"b64": _b64(GOOD_RED)}]), 422, "malformed_request"),
    RequestKind("json-string", as_json("images"), 422, "malformed_request"),
    RequestKind("json-null", as_json(None), 422, "malformed_request"),
    RequestKind("json-number", as_json(1e308), 422, "malformed_request"),
    RequestKind("json-invalid", raw(b'{"images": [', "application/json"), 422, "malformed_request"),
    RequestKind("json-deeply-nested", raw(b"[" * 200_000, "application/json"), 413, "request_too_complex"),
    RequestKind("json-too-many-values", raw(b"[" + b"{}," * 200_000 + b"{}]", "application/json"), 413, "request_too_complex"),
    RequestKind("json-not-utf8", raw(b'{"images": "\xff\xfe"}', "application/json"), 422, "malformed_request"),
    RequestKind("json-images-not-list", as_json({"images": {"b64": _b64(GOOD_RED)}}), 422, "malformed_request"),
    RequestKind("json-empty-images", as_json({"images": []}), 422, "empty_input"),
    RequestKind("json-100-images", as_json({"images": [{"b64": "AA=="}] * 100}), 413, "too_many_images"),
    RequestKind("json-head-not-string", with_good(head=["colors"]), 422, "malformed_request"),
    RequestKind("json-top-k-string", with_good(top_k="many"), 422, "malformed_request"),
    RequestKind("json-top-k-huge", with_good(top_k=10**30), 422, "malformed_request"),
    RequestKind("query-top-k-zero", raw(GOOD_RED, top_k="0"), 422, "malformed_request"),
    RequestKind(
        "embed-normalize-garbage",
        {"data": {"normalize": "perhaps"}, "files": multipart(("a.png", GOOD_RED))},
        422,
        "malformed_request",
        path="/v1/embed",
    ),
    RequestKind("content-type-text", raw(GOOD_RED, "text/plain"), 415, "unsupported_media_type"),
    RequestKind("content-type-missing", raw(GOOD_RED, ""), 415, "unsupported_media_type"),
    RequestKind("head-dotdot-query", raw(GOOD_RED, head="../../etc/passwd"), 404, "head_not_found"),
    RequestKind("head-unicode-query", raw(GOOD_RED, head="têtе\u202e"), 404, "head_not_found"),
    RequestKind("head-dotdot-json", with_good(head="../heads/colors"), 404, "head_not_found"),
    RequestKind("head-dotdot-form", {"data": {"head": ".."}, "files": multipart(("a.png", GOOD_RED))}, 404, "head_not_found"),
    RequestKind("head-nul-byte", raw(GOOD_RED, head="colors\x00.pkl"), 404, "head_not_found"),
    RequestKind("head-too-long", raw(GOOD_RED, head="a" * 500), 422, "malformed_request"),
    RequestKind("head-dotdot-path-reload", {}, 404, "not_found", path="/v1/models/..%2F..%2Fetc/reload"),
    RequestKind("head-dotdot-path-card", {}, 404, "head_not_found", path="/v1/models/..colors", method="GET"),
    RequestKind("head-unicode-path", {}, 404, "head_not_found", path="/v1/models/caf%C3%A9%E2%80%AE", method="GET"),
    RequestKind("head-missing", {"headers": ADMIN}, 404, "head_not_found", path="/v1/models/nope/reload"),
    RequestKind("unknown-path", {}, 404, "not_found", path="/v1/../../etc/passwd", method="GET"),
    RequestKind("wrong-method", {}, 405, "method_not_allowed", method="GET"),
]


@pytest.mark.parametrize("kind", REQUEST_KINDS, ids=lambda k: k.name)
def test_request_kind(kind: RequestKind, server: ServerProcess, client: httpx.Client) -> None:
    r = kind.send(client)
    assert_error(r, kind.status, kind.code)
    if callable(kind.request.get("content")):  # really sent without announcing its size
        assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert_healthy(server, client)


PER_ITEM = {
    "empty-file-part": ("files", ("empty.jpg", b"", "image/jpeg"), "empty_input", 422),
    "part-without-file-name": ("image", (None, GOOD_RED), "malformed_request", 422),
}


@pytest.mark.parametrize("name", sorted(PER_ITEM))
def test_bad_part_between_good_images(name: str, server: ServerProcess, client: httpx.Client) -> None:
    field, value, code, status = PER_ITEM[name]
    files = [*multipart(("red.png", GOOD_RED)), (field, value), *multipart(("blue.jpg", GOOD_BLUE))]
    r = client.post("/v1/classify", files=files)
    assert r.status_code == 200, r.text
    first, middle, last = r.json()["results"]
    assert (first["label"], last["label"]) == ("red", "blue")
    assert middle["error"]["code"] == code and middle["error"]["status"] == status
    assert_healthy(server, client)


def test_bad_json_items_between_good_images(server: ServerProcess, client: httpx.Client) -> None:
    images = [
        {"b64": _b64(GOOD_RED), "name": "red"},
        {"b64": "%%%"},
        {"b64": None},
        "not an object",
        {"b64": _b64(b"plain text")},
        {"b64": _b64(png_bomb())},
        {"b64": _b64(GOOD_BLUE), "name": "blue"},
    ]
    r = client.post("/v1/classify", **as_json({"images": images, "top_k": 1}))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x.get("label") for x in results] == ["red", None, None, None, None, None, "blue"]
    assert [x["error"]["code"] for x in results[1:-1]] == [
        "malformed_request", "malformed_request", "malformed_request", "unsupported_format", "image_too_large",
    ]  # fmt: skip
    assert results[0]["top_k"][0]["label"] == "red"
    assert_healthy(server, client)


def test_request_id_header_is_not_reflected_when_hostile(server: ServerProcess, client: httpx.Client) -> None:
    r = client.post("/v1/classify", content=b"", headers={"content-type": "image/jpeg", "x-request-id": "<script>" + "a" * 500})
    err = assert_error(r, 422, "empty_input")
    assert err["request_id"] != "<script>" + "a" * 500 and len(err["request_id"]) == 32
    assert_healthy(server, client)


def test_kind_count() -> None:
    """The issue's target: at least 30 kinds of hostile input."""
    kinds = len(IMAGE_KINDS) + len(REQUEST_KINDS) + len(ORIENTATIONS) + 2  # + wrong extension, hostile request id
    print(f"hostile kinds: {len(IMAGE_KINDS)} image kinds x 2, {len(REQUEST_KINDS)} request kinds, 8 EXIF orientations: {kinds}")
    assert kinds >= 30


# --- EXIF orientation: every rotated/mirrored photo equals its upright version ----------------
# The stored pixels for EXIF orientation o, given the upright picture (EXIF 2.3, tag 0x0112):
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),  # shown after turning 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),  # shown after turning 90 degrees counter-clockwise
}


def upright_picture() -> np.ndarray:
    """48 x 32, no symmetry: four coloured quadrants and a bright corner."""
    a = np.zeros((32, 48, 3), np.uint8)
    a[:16, :24], a[:16, 24:], a[16:, :24], a[16:, 24:] = (220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)
    a[:6, :6] = 255
    return a


def with_orientation(orientation: int, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(np.ascontiguousarray(ORIENTATIONS[orientation](upright_picture())))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_load_image_equals_upright(orientation: int) -> None:
    upright = load_image(pil_bytes(Image.fromarray(upright_picture()), "PNG"), 32)
    assert np.array_equal(load_image(with_orientation(orientation), 32), upright)
    jpeg = load_image(with_orientation(orientation, "JPEG"), 32).astype(int)
    assert np.abs(jpeg - upright).mean() < 6
    if orientation != 1:  # the check can fail: the stored pixels alone are not upright
        raw = Image.fromarray(np.ascontiguousarray(ORIENTATIONS[orientation](upright_picture())))
        assert np.abs(load_image(pil_bytes(raw, "PNG"), 32).astype(int) - upright).mean() > 20


def test_exif_orientation_through_the_server(server: ServerProcess, client: httpx.Client) -> None:
    """All eight orientations in one request embed exactly like the upright picture."""
    files = multipart(*[(f"o{o}.png", with_orientation(o)) for o in sorted(ORIENTATIONS)])
    files += multipart(("upright.png", pil_bytes(Image.fromarray(upright_picture()), "PNG")))
    files += multipart(
        ("stored-6.png", pil_bytes(Image.fromarray(np.ascontiguousarray(ORIENTATIONS[6](upright_picture()))), "PNG"))
    )
    r = client.post("/v1/embed", files=files)
    assert r.status_code == 200, r.text
    vectors = np.array([x["embedding"] for x in r.json()["results"]], np.float32)
    upright, unrotated = vectors[-2], vectors[-1]
    for o, v in zip(sorted(ORIENTATIONS), vectors[:8], strict=True):
        np.testing.assert_allclose(v, upright, rtol=1e-5, atol=1e-5, err_msg=f"orientation {o}")
    assert not np.allclose(unrotated, upright, rtol=1e-3, atol=1e-3)
    assert_healthy(server, client)


# --- modes, one level down: every mode becomes the RGB a viewer would show ---------------------
def test_modes_decode_to_rgb() -> None:
    grey16 = Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16))
    assert np.all(np.abs(load_image(pil_bytes(grey16, "PNG"), 4).astype(int) - 127) <= 1)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red → white
    assert np.all(load_image(pil_bytes(rgba, "PNG"), 4) == 255)
    la = Image.new("LA", (8, 8), (0, 255))  # opaque black
    assert np.all(load_image(pil_bytes(la, "PNG"), 4) == 0)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert np.all(np.abs(load_image(pil_bytes(cmyk, "TIFF"), 4).astype(int) - [255, 0, 0]) <= 2)
    assert load_image(png_rgb48(), 8).shape == (8, 8, 3)
    assert load_image(image_bytes(RED, "PNG", size=(1, 1)), 8).shape == (8, 8, 3)
