"""Peak RSS of a real ``tlserve serve`` while it answers each hostile recipe of issue 24 (items 2, 3, 4, 7).

One fresh server per recipe (tiny store, as the tests use); the server's ``VmHWM`` is reset through
``/proc/PID/clear_refs`` just before the request and read after the answer. A watchdog kills the server
once its RSS passes ``--kill-at`` (default 6 GiB), so measuring old code cannot exhaust the machine
(the full 64 MiB gzip-JSON recipe took the old server past 24 GB). Run it from a checkout, old or new:

    PYTHONPATH=$PWD python benchmarks/rss_bounds.py [--scale 1/16] [recipe ...]

``--scale`` shrinks the recipes whose cost on old code grows with their size (memory scales linearly).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import make_tiny_store  # noqa: E402
from tests.helpers import ServerProcess, free_port, settings_env  # noqa: E402

MiB = 1024 * 1024
KEY = {"x-api-key": "user-key"}
ADMIN = {"x-api-key": "admin-key"}


def _rss(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(key)


def objects(size: int, head: bytes, tail: bytes = b"{}]}") -> bytes:
    return head + b"{}," * ((size - len(head) - len(tail)) // 3) + tail


def long_name_tar_bz2(name_bytes: int) -> bytes:
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, name_bytes
    packer = bz2.BZ2Compressor(9)
    out = [packer.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    step = bytes(16 * MiB)
    for _ in range(name_bytes // len(step)):
        out.append(packer.compress(step))
    out.append(packer.flush())
    return b"".join(out)


def zip_entries(n: int) -> bytes:
    import struct

    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    return local + entry * n + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(entry) * n, len(local), 0)


def float_tiff(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("F", (width, height), 0.5).save(buf, "TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def grpc_call(port: int, payload: bytes, key: str) -> str:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                payload, metadata=(("x-api-key", key),), timeout=300
            )
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()[:100]}"
    return "OK"


def recipes(scale: Fraction) -> dict[str, tuple[str, Callable[[ServerProcess], str]]]:
    body = 64 * MiB - 1024
    scaled = int(body * scale)

    def v2_gzip(s: ServerProcess) -> str:
        bomb = gzip.compress(objects(scaled, b'{"inputs":[],"outputs":['), 9)
        r = httpx.post(s.url + "/v2/models/colors/infer", content=bomb, headers={**KEY, "Content-Encoding": "gzip"}, timeout=600)
        return f"{r.status_code} {r.text[:100]}"

    def v1_json(s: ServerProcess) -> str:
        doc = objects(body, b'{"images":[')
        r = httpx.post(s.url + "/v1/classify", content=doc, headers={**KEY, "content-type": "application/json"}, timeout=600)
        return f"{r.status_code} {r.text[:100]}"

    def grpc_wrong_key(s: ServerProcess) -> str:
        return grpc_call(int(s.env["TLSERVE_GRPC_PORT"]), b"\x0a\x06colors" + b"\x32\x00" * (body // 2 - 8), "wrong")

    def grpc_good_key(s: ServerProcess) -> str:
        return grpc_call(int(s.env["TLSERVE_GRPC_PORT"]), b"\x0a\x06colors" + b"\x32\x00" * (scaled // 2 - 8), "user-key")

    def tar_bomb(s: ServerProcess) -> str:
        bomb = long_name_tar_bz2(max(16 * MiB, int((1 << 30) * scale)))
        r = httpx.post(s.url + "/v1/heads/bombed/examples", files={"archive": ("a.tar.bz2", bomb)}, headers=ADMIN, timeout=600)
        return f"{len(bomb)}-byte archive: {r.status_code} {r.text[:120]}"

    def zip_directory(s: ServerProcess) -> str:
        r = httpx.post(s.url + "/v1/heads/bombed/examples", files={"archive": ("a.zip", zip_entries(850_000))}, headers=ADMIN,
                       timeout=600)  # fmt: skip
        return f"{r.status_code} {r.text[:120]}"

    def tiff_f(s: ServerProcess) -> str:
        r = httpx.post(s.url + "/v1/classify", content=float_tiff(6000, 4000), headers={**KEY, "content-type": "image/tiff"},
                       timeout=600)  # fmt: skip
        return f"{r.status_code} {r.text[:80]}"

    return {
        "v2-gzip-json": (f"{scaled / MiB:.0f} MiB of {{}},{{}},... gzip-compressed to /v2 infer", v2_gzip),
        "v1-json": ('64 MiB of {"images":[{},{},...]} to /v1/classify', v1_json),
        "grpc-wrong-key": ("64 MiB ModelInfer of empty outputs, wrong API key", grpc_wrong_key),
        "grpc-good-key": (f"{scaled / MiB:.0f} MiB ModelInfer of empty outputs, valid API key", grpc_good_key),
        "tar-long-name": (
            f"tar.bz2 whose GNU long name declares {max(16 * MiB, int((1 << 30) * scale)) / MiB:.0f} MiB",
            tar_bomb,
        ),
        "zip-directory": ("zip with 850k central directory entries (41 MB)", zip_directory),
        "tiff-float": ("6000x4000 deflate TIFF of mode F (24 MP)", tiff_f),
    }


def measure(store: Path, name: str, what: str, send: Callable[[ServerProcess], str], kill_at: int) -> None:
    env = settings_env(store, default_head="colors", api_keys="user-key", admin_keys="admin-key", grpc_port=free_port())
    server = ServerProcess(env).start()
    assert server.proc is not None
    pid, killed = server.proc.pid, threading.Event()
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    base = _rss(pid, "VmRSS")

    def watchdog() -> None:
        while server.proc is not None and server.proc.poll() is None:
            try:
                if _rss(pid, "VmRSS") > kill_at:
                    killed.set()
                    server.proc.send_signal(signal.SIGKILL)
                    return
            except (OSError, LookupError):
                return
            time.sleep(0.02)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        answer = send(server)
    except Exception as exc:
        answer = f"no answer ({type(exc).__name__})"
    try:
        rise = f"{(_rss(pid, 'VmHWM') - base) / MiB:,.0f} MiB"
    except (OSError, LookupError):
        rise = f"> {kill_at / MiB:,.0f} MiB (killed by the watchdog)" if killed.is_set() else "(server died)"
    alive = server.proc.poll() is None
    print(f"{name:15} peak RSS rise {rise:>40}  {'alive' if alive else 'DEAD'}  {what}: {answer}", flush=True)
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="*")
    parser.add_argument("--scale", type=Fraction, default=Fraction(1))
    parser.add_argument("--kill-at", type=int, default=6 * 1024 * MiB)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_tiny_store(Path(tmp) / "store").root
        for name, (what, send) in recipes(args.scale).items():
            if not args.recipe or name in args.recipe:
                measure(store, name, what, send, args.kill_at)


if __name__ == "__main__":
    main()
