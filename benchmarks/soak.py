"""Soak: mixed good and bad traffic at concurrency 32 through a real server, for a bounded time.

    python -m benchmarks.soak --seconds 60                  # its own server on a tiny real store
    python -m benchmarks.soak --seconds 60 --store model_store
    python -m benchmarks.soak --url http://127.0.0.1:8000 --pid PID --seconds 60

Every worker loops over weighted scenarios: good images (raw, multipart, JSON base64, embed), bad
ones (text, truncated, bombs, bad JSON, empty, oversized, unknown head), good and bad mixed in
one request, large batches that may meet a full queue (503 + Retry-After, the one 5xx allowed),
and clients that vanish mid-upload or after sending a whole batch. Meanwhile ``/livez`` is polled
every 50 ms and the server's resident memory (``VmRSS``) is sampled. Afterwards the queue-depth
and in-flight gauges must settle (only the scrape itself in flight): nothing leaked.

Prints one JSON report; exit status 1 if any rule was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.helpers import REPO, server_pool, settings_env

BODY_LIMIT = 2_000_000


# --- payloads ------------------------------------------------------------------------------
def _image(color: tuple[int, int, int], fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.integers(-25, 26, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _png_bomb(side: int = 50_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    idat = zlib.compress(bytes(3 * side + 1) * 4, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class Payloads:
    good: list[bytes]
    large: bytes
    text: bytes = b"this is not an image\n" * 40
    bomb: bytes = field(default_factory=_png_bomb)

    @classmethod
    def make(cls) -> Payloads:
        good = [
            _image(color, fmt, size, seed)
            for seed, (color, fmt, size) in enumerate(
                [((210, 40, 40), "PNG", (48, 40)), ((40, 40, 210), "JPEG", (64, 64)), ((200, 60, 50), "JPEG", (120, 90))]
            )
        ]
        return cls(good=good, large=_image((40, 40, 210), "JPEG", (640, 480), 9))

    @property
    def truncated(self) -> bytes:
        return self.large[: len(self.large) // 2]


# --- scenarios -------------------------------------------------------------------------------
@dataclass
class Stats:
    by_scenario: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    queue_full: int = 0
    queue_full_without_retry_after: int = 0
    transport_errors: int = 0
    disconnects: int = 0

    def record(self, scenario: str, r: httpx.Response, allowed: set[int]) -> None:
        self.by_scenario[scenario] += 1
        self.by_status[str(r.status_code)] += 1
        if r.status_code == 503:
            body = r.json().get("error", {})
            if body.get("code") == "queue_full":
                self.queue_full += 1
                if not r.headers.get("retry-after"):
                    self.queue_full_without_retry_after += 1
                return
        if r.status_code not in allowed and len(self.unexpected) < 20:
            self.unexpected.append(f"{scenario}: {r.status_code} {r.text[:200]}")
        elif r.status_code not in allowed:
            self.unexpected.append("…")


def _files(*images: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in images]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


Scenario = Callable[[httpx.AsyncClient, Payloads, random.Random], Awaitable[tuple[httpx.Response | None, set[int]]]]


async def good_raw(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
    return await c.post("/v1/classify", content=rng.choice(p.good), headers={"content-type": "image/jpeg"}), {200}


async def good_multipart(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
    files = _files(*[(f"{i}.jpg", rng.choice(p.good)) for i in range(4)], ("large.jpg", p.large))
    return await c.post("/v1/classify", files=files, params={"top_k": 1}), {200}


async def good_json(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
    doc = {"images": [{"b64": _b64(rng.choice(p.good)), "name": f"{i}"} for i in range(3)]}
    return await c.post("/v1/classify", json=doc), {200}


async def embed(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
    return await c.post("/v1/embed", files=_files(("a.png", p.good[0]), ("b.jpg", p.good[1])), params={"normalize": True}), {200}


async def mixed(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
    bad = rng.choice([p.text, p.truncated, p.bomb, b""])
    r = await c.post("/v1/classify", files=_files(("good1.png", p.good[0]), ("bad.jpg", bad), ("good2.jpg", p.good[1])))
    if r.status_code == 200:  # the good ones must still be classified
        results = r.json()["results"]
        ok = "label" in results[0] and "error" in results[1] and "label" in results[2]
        return r, {200} if ok else set()
    return r, {200}


async def big_batch(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
    return await c.post("/v1/classify", files=_files(*[(f"{i}.jpg", p.good[i % 3]) for i in range(32)])), {200}


def _bad(body: Callable[[Payloads], bytes], ctype: str, status: int, params: dict | None = None) -> Scenario:
    async def send(c: httpx.AsyncClient, p: Payloads, rng: random.Random) -> tuple[httpx.Response, set[int]]:
        return await c.post("/v1/classify", content=body(p), headers={"content-type": ctype}, params=params), {status}

    return send


async def _vanish(writer: asyncio.StreamWriter, abort: bool) -> None:
    if abort:  # RST: what the server has not read yet is lost
        writer.transport.abort()
    else:  # FIN: the server reads everything sent, then finds the client gone
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def disconnect_mid_upload(url: str, p: Payloads, abort: bool = True) -> None:
    """Announce a big multipart body, send a part of it, vanish."""
    host, port = url.split("//")[1].split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
        f"Content-Length: {BODY_LIMIT - 1000}\r\n\r\n"
    ).encode()
    part = b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n' + p.large
    writer.write(head + part[: len(part) // 2])
    await writer.drain()
    await asyncio.sleep(0.02)
    await _vanish(writer, abort)


async def disconnect_mid_batch(url: str, p: Payloads, abort: bool = True) -> None:
    """Send a whole 16-image request, then vanish before the answer."""
    host, port = url.split("//")[1].split(":")
    body = (
        b"".join(
            b'--zz\r\nContent-Disposition: form-data; name="files"; filename="%d.jpg"\r\n\r\n' % i + p.good[i % 3] + b"\r\n"
            for i in range(16)
        )
        + b"--zz--\r\n"
    )
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    await asyncio.sleep(0.005)
    await _vanish(writer, abort)


SCENARIOS: list[tuple[str, int, Scenario | None]] = [
    ("good-raw", 25, good_raw),
    ("good-multipart", 12, good_multipart),
    ("good-json", 8, good_json),
    ("embed", 5, embed),
    ("mixed-good-and-bad", 12, mixed),
    ("big-batch", 4, big_batch),
    ("text-as-jpeg", 5, _bad(lambda p: p.text, "image/jpeg", 415)),
    ("truncated-jpeg", 5, _bad(lambda p: p.truncated, "image/jpeg", 422)),
    ("png-bomb", 4, _bad(lambda p: p.bomb, "image/png", 422)),
    ("empty-body", 3, _bad(lambda p: b"", "image/jpeg", 422)),
    ("invalid-json", 3, _bad(lambda p: b'{"images": [{"b64": ', "application/json", 422)),
    ("oversized", 2, _bad(lambda p: bytes(BODY_LIMIT + 1), "image/jpeg", 413)),
    ("unknown-head", 2, _bad(lambda p: p.good[0], "image/png", 404, {"head": "no-such-head"})),
    ("disconnect-mid-upload", 3, None),
    ("disconnect-mid-batch", 3, None),
]


# --- the run ---------------------------------------------------------------------------------
@dataclass
class Report:
    seconds: float
    concurrency: int
    requests: int
    by_status: dict[str, int]
    by_scenario: dict[str, int]
    server_errors: int  # 5xx other than 503 queue_full with Retry-After
    unexpected: list[str]
    queue_full_503: int
    queue_full_without_retry_after: int
    transport_errors: int
    disconnects: int
    livez_polls: int
    livez_failures: int
    livez_max_ms: float
    livez_p99_ms: float
    rss_warm_mb: float
    rss_end_mb: float
    rss_max_mb: float
    rss_growth_pct: float
    rss_timeline_mb: list[float]
    queue_depth_after: float
    in_flight_after: float

    @property
    def ok(self) -> bool:
        return (
            self.server_errors == 0
            and not self.unexpected
            and self.queue_full_without_retry_after == 0
            and self.transport_errors == 0
            and self.livez_failures == 0
            and self.queue_depth_after == 0
            and self.in_flight_after == 1  # the scrape itself
        )


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def gauges(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(("tlserve_queue_depth_images ", "tlserve_in_flight_requests ")):
            name, value = line.split()
            out[name] = float(value)
    return out


async def _worker(url: str, client: httpx.AsyncClient, p: Payloads, stats: Stats, stop: float, seed: int) -> None:
    rng = random.Random(seed)
    names = [s[0] for s in SCENARIOS]
    weights = [s[1] for s in SCENARIOS]
    funcs = {s[0]: s[2] for s in SCENARIOS}
    while time.monotonic() < stop:
        name = rng.choices(names, weights)[0]
        try:
            if name == "disconnect-mid-upload":
                await disconnect_mid_upload(url, p)
            elif name == "disconnect-mid-batch":
                await disconnect_mid_batch(url, p)
            else:
                func = funcs[name]
                assert func is not None
                r, allowed = await func(client, p, rng)
                stats.record(name, r, allowed)
                continue
            stats.disconnects += 1
            stats.by_scenario[name] += 1
        except (httpx.TransportError, OSError) as exc:
            stats.transport_errors += 1
            if len(stats.unexpected) < 20:
                stats.unexpected.append(f"{name}: {type(exc).__name__}: {exc}")


def poll_livez(url: str, seconds: float, interval: float = 0.05) -> dict[str, float]:
    """``/livez`` every ``interval`` s on a fresh connection's worth of work; run in its own process so the
    load generator's busy event loop does not add its delays to the figures."""
    lat, failures = [], 0
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as c:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                failures += c.get("/livez").status_code != 200
            except httpx.HTTPError:
                failures += 1
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(interval)
    arr = np.array(lat or [0.0])
    return {
        "polls": len(lat),
        "failures": failures,
        "max_ms": round(float(arr.max()), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
    }


async def _livez_process(url: str, seconds: float) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.soak", "--livez-probe", url, "--seconds", str(seconds),
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return json.loads(out)


async def _sample_rss(pid: int, stop: float, samples: list[tuple[float, int]]) -> None:
    t0 = time.monotonic()
    while time.monotonic() < stop:
        samples.append((time.monotonic() - t0, rss_kb(pid)))
        await asyncio.sleep(0.25)


async def soak(url: str, pid: int, seconds: float = 20.0, concurrency: int = 32, warmup: float | None = None) -> Report:
    """Drive ``url`` (server process ``pid``) for ``seconds``; RSS growth is measured from the end of ``warmup``."""
    warmup = warmup if warmup is not None else max(2.0, seconds * 0.25)
    payloads, stats = Payloads.make(), Stats()
    rss: list[tuple[float, int]] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        livez, *_ = await asyncio.gather(
            _livez_process(url, seconds),
            _sample_rss(pid, stop, rss),
            *(_worker(url, client, payloads, stats, stop, seed) for seed in range(concurrency)),
        )
        settled: dict[str, float] = {}
        for _ in range(100):  # the work of vanished clients finishes in the background: wait for it
            settled = gauges((await client.get("/metrics")).text)
            if settled.get("tlserve_queue_depth_images") == 0 and settled.get("tlserve_in_flight_requests") == 1:
                break
            await asyncio.sleep(0.1)
    rss_end = rss_kb(pid)
    warm = [kb for t, kb in rss if t >= warmup][:1] or [rss[-1][1]]
    server_errors = sum(n for s, n in stats.by_status.items() if s.startswith("5")) - stats.queue_full
    return Report(
        seconds=seconds,
        concurrency=concurrency,
        requests=sum(stats.by_scenario.values()),
        by_status=dict(sorted(stats.by_status.items())),
        by_scenario=dict(sorted(stats.by_scenario.items())),
        server_errors=server_errors,
        unexpected=stats.unexpected,
        queue_full_503=stats.queue_full,
        queue_full_without_retry_after=stats.queue_full_without_retry_after,
        transport_errors=stats.transport_errors,
        disconnects=stats.disconnects,
        livez_polls=int(livez["polls"]),
        livez_failures=int(livez["failures"]),
        livez_max_ms=livez["max_ms"],
        livez_p99_ms=livez["p99_ms"],
        rss_warm_mb=round(warm[0] / 1024, 1),
        rss_end_mb=round(rss_end / 1024, 1),
        rss_max_mb=round(max(kb for _, kb in rss) / 1024, 1),
        rss_growth_pct=round((rss_end - warm[0]) / warm[0] * 100, 2),
        rss_timeline_mb=[round(kb / 1024, 1) for _, kb in rss[:: max(1, len(rss) // 20)]],
        queue_depth_after=settled.get("tlserve_queue_depth_images", -1),
        in_flight_after=settled.get("tlserve_in_flight_requests", -1),
    )


# --- the command -----------------------------------------------------------------------------
def server_settings(default_head: str, queue_size: int, threads: int = 1) -> dict[str, object]:
    """The settings a soak server runs with (small body limit and queue, so both limits are met)."""
    return {"default_head": default_head, "max_body_bytes": BODY_LIMIT, "max_queue_size": queue_size,
            "intra_op_threads": threads, "head_poll_interval_s": 0, "log_level": "warning"}  # fmt: skip


def server_env(store: Path, default_head: str, queue_size: int, threads: int = 1) -> dict[str, str]:
    """:func:`server_settings` as the ``TLSERVE_*`` environment of a server on ``store``."""
    return settings_env(store, **server_settings(default_head, queue_size, threads))


def _tiny_store(root: Path) -> tuple[Path, str]:
    from tests.conftest import make_tiny_store  # a real VGG16-topology ONNX with few channels + a trained head

    make_tiny_store(root / "store")
    return root / "store", "colors"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default 25%%, at least 2)")
    ap.add_argument("--url", help="drive a running server instead of starting one (needs --pid)")
    ap.add_argument("--pid", type=int, help="the running server's process id (for VmRSS)")
    ap.add_argument("--store", type=Path, help="model store for the server started here (default: a tiny real store)")
    ap.add_argument("--head", default="cats_vs_dogs", help="default head of --store")
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="TLSERVE_INTRA_OP_THREADS for the server started here")
    ap.add_argument("--livez-probe", metavar="URL", help=argparse.SUPPRESS)  # internal: the /livez poller process
    args = ap.parse_args(argv)
    if args.livez_probe:
        print(json.dumps(poll_livez(args.livez_probe, args.seconds)))
        return 0
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, server_pool(Path(tmp)) as start:
        server = None
        if args.url:
            if not args.pid:
                ap.error("--url needs --pid")
            url, pid = args.url.rstrip("/"), args.pid
        else:
            store, head = (args.store, args.head) if args.store else _tiny_store(Path(tmp))
            server = start(store, **server_settings(head, args.queue_size, args.threads))
            assert server.proc is not None
            url, pid = server.url, server.proc.pid
        try:
            report = asyncio.run(soak(url, pid, args.seconds, args.concurrency, args.warmup))
        finally:
            if server is not None:
                server.stop()
        log = server.log_text() if server is not None else ""
        if "Traceback" in log:
            print(log[-4000:], file=sys.stderr)
            report.unexpected.append("traceback in the server log")
    print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
