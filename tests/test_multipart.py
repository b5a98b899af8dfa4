"""multipart/form-data parsed in memory: parts are views into the one body, nothing goes to disk."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.api.multipart import parse_multipart
from app.core.errors import MalformedRequest, TooManyImages
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes, settings_env


def encoded(files: list[tuple[str, bytes]], data: dict[str, str] | None = None) -> tuple[bytearray, str]:
    """A multipart body as httpx (a real client) writes it, and its Content-Type."""
    request = httpx.Request("POST", "http://x/", files=[("file", (n, d, "image/jpeg")) for n, d in files], data=data)
    return bytearray(request.read()), request.headers["content-type"]


def test_file_parts_are_views_into_the_body_and_fields_are_text() -> None:
    red, blue = image_bytes(fmt="JPEG", seed=1), image_bytes(fmt="PNG", seed=2)
    body, ctype = encoded([("red.jpg", red), ("blue.png", blue)], {"top_k": "1", "head": "colors"})
    parts = parse_multipart(body, ctype, max_files=8, max_fields=8)
    by_name = {(p.name, p.filename): p for p in parts}
    assert by_name[("top_k", None)].value == "1" and by_name[("head", None)].value == "colors"
    for name, want in (("red.jpg", red), ("blue.png", blue)):
        part = by_name[("file", name)]
        assert isinstance(part.data, memoryview) and part.data.obj is body  # no copy of the file
        assert part.data == want


def test_boundary_like_bytes_inside_a_file_do_not_split_it() -> None:
    tricky = b"\r\n--not-the-boundary\r\n" + bytes(range(256)) * 50 + b"\r\n--"
    body, ctype = encoded([("a.bin", tricky)])
    (part,) = parse_multipart(body, ctype, max_files=1, max_fields=1)
    assert bytes(part.data) == tricky


def test_limits_and_malformed_bodies() -> None:
    body, ctype = encoded([(f"{i}.png", b"x") for i in range(5)])
    with pytest.raises(TooManyImages, match=r"Too many files\. Maximum number of files is 4"):
        parse_multipart(body, ctype, max_files=4, max_fields=4)
    body, ctype = encoded([("a.png", b"x")], {f"f{i}": "v" for i in range(5)})
    with pytest.raises(TooManyImages, match="Too many fields"):
        parse_multipart(body, ctype, max_files=4, max_fields=4)
    body, ctype = encoded([("a.png", b"x")], {"note": "v" * 2000})
    with pytest.raises(MalformedRequest, match="field 'note' is over 1000 bytes"):
        parse_multipart(body, ctype, max_files=4, max_fields=4, max_field_bytes=1000)
    with pytest.raises(MalformedRequest, match="Missing boundary"):
        parse_multipart(body, "multipart/form-data", max_files=4, max_fields=4)
    with pytest.raises(MalformedRequest, match="Invalid multipart data"):
        parse_multipart(bytearray(b"\x00\xff" * 100), "multipart/form-data; boundary=zz", max_files=4, max_fields=4)
    nameless = bytearray(b'--zz\r\nContent-Disposition: form-data; filename="a"\r\n\r\nx\r\n--zz--\r\n')
    with pytest.raises(MalformedRequest, match='"name" must be provided'):
        parse_multipart(nameless, "multipart/form-data; boundary=zz", max_files=4, max_fields=4)


def test_the_field_charset_is_honoured() -> None:
    body = bytearray('--zz\r\nContent-Disposition: form-data; name="head"\r\n\r\ncaf\xe9\r\n--zz--\r\n'.encode("latin-1"))
    (part,) = parse_multipart(body, "multipart/form-data; boundary=zz; charset=latin-1", max_files=1, max_fields=1)
    assert part.value == "café"


def written_bytes(pid: int) -> int:
    """Bytes the process passed to write(2) and friends: files, pipes and sockets alike."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["wchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/PID/io")
def test_a_server_writes_no_upload_anywhere(tiny_store: ModelStore, tmp_path: Path) -> None:
    """Starlette's form parser wrote every file part over 1 MB to a temporary file (RAM again on a tmpfs /tmp)."""
    server = ServerProcess(settings_env(tiny_store.root, default_head="colors"), log_path=tmp_path / "server.log").start()
    try:
        big = image_bytes(fmt="PNG", size=(1400, 1000), noise=120)  # ~4 MB, incompressible
        assert len(big) > 2_000_000
        files = [("file", (f"{i}.png", big, "image/png")) for i in range(3)]
        assert server.proc is not None
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.post("/v1/classify", files=files).status_code == 200  # warm: first-request writes
            before = written_bytes(server.proc.pid)
            for _ in range(3):
                r = client.post("/v1/classify", files=files)
                assert r.status_code == 200, r.text
                assert len({res["label"] for res in r.json()["results"]}) == 1
            written = written_bytes(server.proc.pid) - before
        assert written < 200_000, f"the server wrote {written} bytes while receiving {9 * len(big)} bytes of uploads"
    finally:
        server.stop()
