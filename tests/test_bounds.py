"""Bounds before work (issue 24): every parser is bounded from the raw bytes, before it allocates.

Each recipe of the issue, against a real ``tlserve serve`` where memory is the point: the server's peak
resident memory (``VmHWM`` in ``/proc/PID/status``, reset through ``clear_refs`` before each request) may
rise by at most a stated bound while it refuses the request with a named error, and it stays healthy.
"""

from __future__ import annotations

import asyncio
import bz2
import functools
import gzip
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.requests import Request

from app.core.errors import ArchiveTooLarge, UnsafeArchive
from app.core.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGE_PIXELS, Settings
from app.learning.uploads import check_archive
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, free_port, image_bytes

MiB = 1024 * 1024
USER, ADMIN = {"x-api-key": "user-key"}, {"x-api-key": "admin-key"}


# --- the server and its memory ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", api_keys="user-key", admin_keys="admin-key",
                                 grpc_port=free_port())  # fmt: skip


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


@contextmanager
def peak_rise(server: ServerProcess) -> Iterator[list[int]]:
    """``[bytes]``: how far the server's peak RSS rose above its resident memory while the block ran."""
    assert server.proc is not None
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status(pid)["VmRSS"]
    out = [0]
    yield out
    out[0] = _status(pid)["VmHWM"] - before
    print(f"peak RSS rise: {out[0] / MiB:.1f} MiB")


def assert_refused(r: httpx.Response, status: int, code: str, words: str) -> None:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    if isinstance(error, dict):  # /v1 shape; /v2 answers {"error": "message"} (the OIP's)
        assert error["code"] == code, error
        error = error["message"]
    assert words in error, error


def assert_healthy(server: ServerProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None, "the server died"
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    assert "Traceback" not in server.log_text()


# --- item 2: JSON bodies ---------------------------------------------------------------------
def empty_objects(size: int, head: bytes = b'{"inputs":[],"outputs":[', tail: bytes = b"{}]}") -> bytes:
    """A JSON document of about ``size`` bytes: one list of empty objects (what json.loads turns into ~25x)."""
    n = (size - len(head) - len(tail)) // 3
    return head + b"{}," * n + tail


def test_gzip_json_bomb_on_v2_is_refused_before_it_is_parsed(server: ServerProcess) -> None:
    """The issue's recipe: ~65 KB of gzip inflating to 64 MiB of ``{},{},…`` (+1.7 GB RSS before)."""
    bomb = gzip.compress(empty_objects(DEFAULT_MAX_BODY_BYTES - 1024), 9)
    assert len(bomb) < 200_000
    with peak_rise(server) as rise:
        r = httpx.post(server.url + "/v2/models/colors/infer", content=bomb, timeout=120,
                       headers={**USER, "Content-Encoding": "gzip", "content-type": "application/json"})  # fmt: skip
    assert_refused(r, 413, "request_too_complex", "max_request_elements")
    assert rise[0] < 256 * MiB  # the inflated body and its text, not the objects
    assert_healthy(server)


def test_large_json_body_on_v1_classify_is_refused_before_it_is_parsed(server: ServerProcess) -> None:
    """The same 64 MiB document, uncompressed, on ``/v1/classify``."""
    body = empty_objects(DEFAULT_MAX_BODY_BYTES - 1024, b'{"images":[', b"{}]}")
    with peak_rise(server) as rise:
        r = httpx.post(server.url + "/v1/classify", content=body, timeout=120,
                       headers={**USER, "content-type": "application/json"})  # fmt: skip
    assert_refused(r, 413, "request_too_complex", "max_request_elements")
    assert rise[0] < 256 * MiB
    assert_healthy(server)


def test_json_nesting_is_bounded_on_both_fronts(server: ServerProcess) -> None:
    deep = b'{"images": ' + b"[" * 40 + b"]" * 40 + b"}"
    r = httpx.post(server.url + "/v1/classify", content=deep, headers={**USER, "content-type": "application/json"})
    assert_refused(r, 413, "request_too_complex", "max_json_depth")
    deep = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ' + b"[" * 40 + b"]" * 40 + b"}]}"
    r = httpx.post(server.url + "/v2/models/colors/infer", content=deep, headers=USER)
    assert_refused(r, 413, "request_too_complex", "max_json_depth")


def test_a_good_json_request_within_the_bounds_is_served(server: ServerProcess) -> None:
    import base64

    png = base64.b64encode(image_bytes((210, 40, 40))).decode()
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [png, png]}]}
    r = httpx.post(server.url + "/v2/models/colors/infer", content=gzip.compress(json.dumps(doc).encode()),
                   headers={**USER, "Content-Encoding": "gzip"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["red", "red"]


def test_decompressed_size_is_capped_while_the_body_streams(tiny_store: ModelStore, server_factory) -> None:
    """``max_decompressed_bytes`` is its own bound, applied while the body inflates, chunk by chunk."""
    small = server_factory(tiny_store, default_head="colors", max_decompressed_bytes=MiB)
    bomb = gzip.compress(b" " * (32 * MiB))

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(bomb), 4096):
            yield bomb[i : i + 4096]

    r = httpx.post(small.url + "/v2/models/colors/infer", content=chunks(), headers={"Content-Encoding": "gzip"})
    assert_refused(r, 413, "body_too_large", "max_decompressed_bytes")
    r = httpx.post(small.url + "/v2/models/colors/infer", content=gzip.compress(b"{}") + b"junk",
                   headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert_refused(r, 400, "malformed_request", "follow the end of the gzip data")


def _request(body: bytes, content_type: str = "application/json") -> Request:
    """A real Starlette request whose body arrives in one message (receiving it never yields to the loop)."""
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def _loop_turns_while(work: Callable[[], object]) -> int:
    """How many times the event loop ran another task while ``work()`` (a coroutine) was awaited."""

    async def main() -> int:
        turns = 0
        done = False

        async def ticker() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = turns
        try:
            await work()  # type: ignore[misc]
        finally:
            done = True
            await task
        return turns - start

    return asyncio.run(main())


def test_a_large_json_body_is_parsed_off_the_event_loop() -> None:
    """While a large body is checked and parsed, other tasks (``/livez``) still run."""
    from app.api.inputs import parse_images
    from app.api.oip.codec import parse

    png = __import__("base64").b64encode(image_bytes(size=(400, 400), noise=120)).decode()
    body = json.dumps({"images": [{"b64": png}] * 40}).encode()
    assert len(body) > 1_000_000
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert _loop_turns_while(lambda: parse_images(_request(body), settings)) > 0
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [40], "data": [png] * 40}]}).encode()
    assert _loop_turns_while(lambda: parse(header, settings.max_request_elements, settings.max_json_depth)) > 0


# --- item 3: gRPC --------------------------------------------------------------------------------
def _empty_outputs(size: int) -> bytes:
    """A serialized ModelInferRequest for colors of ~``size`` bytes: ``outputs`` (field 6) repeated empty."""
    return b"\x0a\x06colors" + b"\x32\x00" * ((size - 8) // 2)


def _raw_call(server: ServerProcess, payload: bytes, metadata: tuple[tuple[str, str], ...], **kw: object):
    grpc = pytest.importorskip("grpc")
    with grpc.insecure_channel(f"127.0.0.1:{server.env['TLSERVE_GRPC_PORT']}", **kw) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            call(payload, metadata=metadata, timeout=120)
    return err.value


def test_grpc_refuses_a_wrong_key_before_parsing_the_message(server: ServerProcess) -> None:
    """The issue's recipe: a ~64 MiB ModelInfer of empty ``outputs`` (~1.5 GB in the protobuf parser)."""
    payload = _empty_outputs(DEFAULT_MAX_BODY_BYTES - 1024)
    with peak_rise(server) as rise:
        err = _raw_call(server, payload, (("x-api-key", "wrong"),))
    assert err.code().name == "UNAUTHENTICATED", err
    assert rise[0] < 32 * MiB  # refused from the metadata: the message is not even read into Python
    with peak_rise(server) as rise:  # with a good key it is walked on the wire and refused before parsing
        err = _raw_call(server, payload, (("x-api-key", "user-key"),))
    assert err.code().name == "INVALID_ARGUMENT" and "max_request_elements" in err.details(), err
    assert dict(err.trailing_metadata())["tlserve-error-code"] == "request_too_complex"
    assert rise[0] < 320 * MiB
    assert_healthy(server)


def test_grpc_refuses_packed_numbers_beyond_the_bound(server: ServerProcess) -> None:
    """A packed ``shape`` of 1-byte varints is eight bytes a number once parsed: counted too."""
    shape = b"\x01" * 200_000
    tensor = b"\x0a\x05image" + b"\x12\x05BYTES" + b"\x1a" + _varint(len(shape)) + shape
    payload = b"\x0a\x06colors" + b"\x2a" + _varint(len(tensor)) + tensor
    err = _raw_call(server, payload, (("x-api-key", "user-key"),))
    assert err.code().name == "INVALID_ARGUMENT" and "max_request_elements" in err.details(), err


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_grpc_refuses_compressed_messages_by_default(server: ServerProcess) -> None:
    grpc = pytest.importorskip("grpc")
    tiny = b"\x0a\x06colors"
    err = _raw_call(server, tiny, (("x-api-key", "user-key"),), compression=grpc.Compression.Gzip)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
    err = _raw_call(server, tiny, (("x-api-key", "user-key"),))  # the same message uncompressed reaches the servicer
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in err.details(), err


def test_grpc_compression_when_on_is_bounded_by_the_inflated_size(tiny_store: ModelStore, server_factory) -> None:
    """With ``grpc_compression`` a gzip message is accepted, and the size cap applies once it is inflated."""
    grpc = pytest.importorskip("grpc")
    on = server_factory(tiny_store, default_head="colors", grpc_compression="true", max_body_bytes=MiB, grpc_port=free_port())
    tiny = b"\x0a\x06colors"
    err = _raw_call(on, tiny, (), compression=grpc.Compression.Gzip)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in err.details(), err  # reached the servicer
    padded = tiny + b"\x3a" + _varint(8 * MiB) + bytes(8 * MiB)  # raw_input_contents: 8 MiB of zeros, ~8 KB gzipped
    err = _raw_call(on, padded, (), compression=grpc.Compression.Gzip)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err


# --- item 4: archive headers -------------------------------------------------------------------
@functools.cache
def long_name_bomb() -> bytes:
    """The issue's recipe: a ``.tar.bz2`` under 1 KB whose GNU long-name header declares a 1 GiB name (and
    holds it: 1 GiB of zeros, which bzip2 packs into a few hundred bytes)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1 << 30
    packer = bz2.BZ2Compressor(9)
    out = [packer.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    zeros = bytes(16 * MiB)
    out += [packer.compress(zeros) for _ in range(64)]
    out.append(packer.flush())
    return b"".join(out)


def test_tar_long_name_bomb_is_refused_before_tarfile_reads_it(server: ServerProcess) -> None:
    bomb = long_name_bomb()
    assert len(bomb) < 1024
    with peak_rise(server) as rise:
        r = httpx.post(server.url + "/v1/heads/bombed/examples", files={"archive": ("a.tar.bz2", bomb)},
                       headers=ADMIN, timeout=120)  # fmt: skip
    assert_refused(r, 413, "archive_too_large", "max_archive_header_bytes")
    assert rise[0] < 64 * MiB  # before: 4.5-6.1 GB
    assert_healthy(server)


def _tar_with_header(kind: bytes, declared: int, data: bytes = b"") -> bytes:
    info = tarfile.TarInfo("././@PaxHeader" if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE) else "././@LongLink")
    info.type, info.size = kind, declared
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * 1024


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE],
                         ids=["gnu-long-name", "gnu-long-link", "pax", "pax-global"])  # fmt: skip
def test_every_extended_tar_header_is_budgeted_by_its_declared_size(tmp_path: Path, kind: bytes) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(_tar_with_header(kind, 1 << 30))  # declares 1 GiB, holds nothing: refused by the declaration
    with pytest.raises(ArchiveTooLarge, match="max_archive_header_bytes"):
        check_archive(path, "a.tar", Settings(_env_file=None), [1 << 40])  # type: ignore[call-arg]


def test_chained_long_name_headers_count_together(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, max_archive_header_bytes=4096)  # type: ignore[call-arg]
    one = _tar_with_header(tarfile.GNUTYPE_LONGNAME, 3000, b"a" * 3000 + b"\0" * (3072 - 3000))[:-1024]
    path = tmp_path / "a.tar"
    path.write_bytes(one + one + b"\0" * 1024)  # two 3000-byte long names before one member: 6000 > 4096
    with pytest.raises(ArchiveTooLarge, match="declare 6000 bytes"):
        check_archive(path, "a.tar", settings, [1 << 40])


def test_gnu_sparse_members_are_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("red/a.png")
    info.type = tarfile.GNUTYPE_SPARSE
    path = tmp_path / "a.tar"
    path.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    with pytest.raises(UnsafeArchive, match="sparse"):
        check_archive(path, "a.tar", Settings(_env_file=None), [1 << 40])  # type: ignore[call-arg]


def zip_of_entries(n: int, count: int = 1) -> bytes:
    """A zip whose central directory holds ``n`` entries (each a 1-byte name, pointing at one local header)
    while its end record claims ``count``: zipfile walks the directory's bytes, not the count."""
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * n
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(local), 0)
    return local + directory + end


def test_zip_central_directory_is_budgeted_before_zipfile_reads_it(server: ServerProcess) -> None:
    """~850k entries in 40 MB of central directory (zipfile would build a ZipInfo for each: ~0.5 GB)."""
    archive = zip_of_entries(850_000)
    assert len(archive) > 16 * MiB
    with peak_rise(server) as rise:
        r = httpx.post(server.url + "/v1/heads/bombed/examples", files={"archive": ("a.zip", archive)},
                       headers=ADMIN, timeout=120)  # fmt: skip
    assert_refused(r, 413, "archive_too_large", "max_archive_header_bytes")
    assert rise[0] < 128 * MiB
    assert_healthy(server)


def test_zip_entries_are_counted_from_the_directory_not_its_end_record(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(zip_of_entries(50, count=1))
    settings = Settings(_env_file=None, max_archive_members=40)  # type: ignore[call-arg]
    with pytest.raises(ArchiveTooLarge, match="max_archive_members"):
        check_archive(path, "a.zip", settings, [1 << 40])


# --- item 7: decoding, /metrics, /docs -------------------------------------------------------
def test_deflate_float_tiff_decodes_within_the_budget(server: ServerProcess) -> None:
    """The issue's recipe: a deflate TIFF of mode F (a few hundred KB) decoded at 13 bytes a pixel before;
    now the decode and the conversion stay under 8 bytes a pixel (the budget is 10 of max_image_pixels)."""
    width, height = 6000, 4000
    buf = io.BytesIO()
    Image.new("F", (width, height), 0.5).save(buf, "TIFF", compression="tiff_adobe_deflate")
    tiff = buf.getvalue()
    assert len(tiff) < 1_000_000
    with peak_rise(server) as rise:
        r = httpx.post(server.url + "/v1/classify", content=tiff, headers={**USER, "content-type": "image/tiff"}, timeout=120)
    assert r.status_code == 200, r.text
    assert rise[0] < 8 * width * height, f"{rise[0] / (width * height):.1f} bytes a pixel"


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [("HEIF", "RGB", (8064, 6048)), ("JPEG", "RGB", (8160, 6120)), ("PNG", "RGB", (8160, 6120)),
     ("PNG", "RGBA", (8160, 6120)), ("TIFF", "RGB", (8160, 6120)), ("TIFF", "F", (8160, 6120)),
     ("TIFF", "CMYK", (8160, 6120)), ("AVIF", "RGB", (8160, 6120))],
)  # fmt: skip
def test_the_documented_photos_fit_the_decode_budget(fmt: str, mode: str, size: tuple[int, int]) -> None:
    """The settings promise that a 50 MP photo and a 48 MP iPhone HEIC fit: the budget keeps that promise."""
    from app.core.imaging import BUDGET_BYTES_PER_PIXEL, decode_cost
    from tests import photos

    small = Image.new(mode, (16, 16)) if mode != "RGB" else Image.new("RGB", (16, 16), (10, 20, 30))
    with Image.open(io.BytesIO(photos.encode(small, fmt))) as img:
        assert (img.format, img.mode) == (fmt, mode)
        assert size[0] * size[1] * decode_cost(img) <= DEFAULT_MAX_IMAGE_PIXELS * BUDGET_BYTES_PER_PIXEL


def test_image_open_tries_only_the_allowed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PPM sent where only PNG and JPEG are allowed never reaches Pillow's PPM parser."""
    from app.core.errors import UnsupportedFormat
    from app.core.imaging import load_image

    Image.init()
    factory, accept = Image.OPEN["PPM"]
    opened: list[str] = []

    def spy(fp, filename=None):  # type: ignore[no-untyped-def]
        opened.append("PPM")
        return factory(fp, filename)

    monkeypatch.setitem(Image.OPEN, "PPM", (spy, accept))
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, "PPM")
    with pytest.raises(UnsupportedFormat, match="PPM is not allowed"):
        load_image(ppm.getvalue(), 8, formats=("PNG", "JPEG"))
    assert opened == []
    load_image(ppm.getvalue(), 8, formats=("PPM",))
    assert opened == ["PPM"]  # the spy is in Pillow's path when the format is allowed


def test_jpegmem_follows_the_configured_pixel_limit(tiny_settings: Settings) -> None:
    import app.core.imaging as imaging
    from app.serving.service import Service

    if imaging._OPERATOR_JPEGMEM is not None:
        pytest.skip("JPEGMEM set by the environment: an operator's value wins")
    try:
        Service(tiny_settings.model_copy(update={"max_image_pixels": 1_000_000}))
        assert os.environ["JPEGMEM"] == "72M"  # 8 bytes a pixel + 64 MB
        Service(tiny_settings.model_copy(update={"max_image_pixels": 200_000_000}))
        assert os.environ["JPEGMEM"] == "1664M"
    finally:
        imaging.configure(DEFAULT_MAX_IMAGE_PIXELS)


def test_metrics_hide_per_class_answers_by_default(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/classify", content=image_bytes((210, 40, 40)), headers={**USER, "content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'tlserve_prediction_confidence_count{head="colors"}' in metrics  # monitoring without the classes
    assert "tlserve_prediction_answers_total{" not in metrics


def test_swagger_ui_is_off_by_default(server: ServerProcess, tiny_store: ModelStore, server_factory) -> None:
    """Swagger UI and ReDoc pages load their scripts from a CDN: served only with ``docs`` on."""
    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert httpx.get(server.url + "/openapi.json").status_code == 200
    documented = server_factory(tiny_store, default_head="colors", docs="true")
    page = httpx.get(documented.url + "/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
