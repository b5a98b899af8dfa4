"""Load and soak through a real server (bounded for CI; ``python -m benchmarks.soak --seconds 60`` for the full run).

Mixed good and bad traffic at concurrency 32 (:mod:`benchmarks.soak`): no 5xx except 503 + Retry-After
from a full queue, resident memory after warm-up grows < 5 %, ``/livez`` answers throughout (its max
latency is printed, not asserted), and clients that vanish mid-upload or mid-batch leave no work behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import httpx
import pytest

from app.storage.store import ModelStore
from benchmarks.soak import BODY_LIMIT, Payloads, disconnect_mid_batch, disconnect_mid_upload, gauges, soak
from tests.helpers import ServerProcess

SOAK_SECONDS = float(os.environ.get("TLSERVE_SOAK_SECONDS", "20"))


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(
        tiny_store, default_head="colors", max_body_bytes=BODY_LIMIT, max_queue_size=64, log_level="info"
    )


def metrics(server: ServerProcess) -> dict[str, float]:
    return gauges(httpx.get(server.url + "/metrics").text)


def request_counts(text: str, route: str) -> dict[str, int]:
    """``{status: count}`` of ``tlserve_request_duration_seconds_count`` for one route."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("tlserve_request_duration_seconds_count{") and f'route="{route}"' in line:
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0) + int(float(line.split()[-1]))
    return out


def test_vanished_clients_leave_no_work(server: ServerProcess) -> None:
    """16 clients vanish mid-upload and 16 right after sending a 16-image batch, all at once."""
    payloads = Payloads.make()
    before = request_counts(httpx.get(server.url + "/metrics").text, "/v1/classify")

    async def vanish() -> None:
        # FIN, not RST, so that every request surely reached the server and can be accounted for below
        await asyncio.gather(*(disconnect_mid_upload(server.url, payloads, abort=False) for _ in range(16)),
                             *(disconnect_mid_batch(server.url, payloads, abort=False) for _ in range(16)))  # fmt: skip

    asyncio.run(vanish())
    idle = {"tlserve_queue_depth_images": 0, "tlserve_in_flight_requests": 1}  # only the scrape itself in flight
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(100):
            if gauges(c.get("/metrics").text) == idle:
                break
            time.sleep(0.1)
        text = c.get("/metrics").text
        assert gauges(text) == idle
        after = request_counts(text, "/v1/classify")
        done = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert done.get("499") == 16  # the uploads that stopped half-way: no 5xx, no traceback
        assert done.get("200", 0) + done.get("503", 0) == 16  # every whole batch ran (or met a full queue)
        assert set(done) <= {"200", "499", "503"}, done
        r = c.post("/v1/classify", content=payloads.good[0], headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"
    assert "Traceback" not in server.log_text()


def test_soak_mixed_traffic(server: ServerProcess) -> None:
    assert server.proc is not None
    report = asyncio.run(soak(server.url, server.proc.pid, seconds=SOAK_SECONDS, concurrency=32))
    print("\nsoak:", json.dumps({k: v for k, v in asdict(report).items() if k != "rss_timeline_mb"}))
    assert report.requests > 0 and report.disconnects > 0
    assert report.server_errors == 0, report.unexpected
    assert report.unexpected == []
    assert report.queue_full_without_retry_after == 0
    assert report.transport_errors == 0
    assert report.livez_failures == 0 and report.livez_polls > 0
    assert report.rss_growth_pct < 5.0, report.rss_timeline_mb
    assert (report.queue_depth_after, report.in_flight_after) == (0, 1)
    assert report.by_status.get("200", 0) > 0 and report.by_status.get("422", 0) > 0 and report.by_status.get("415", 0) > 0
    assert server.proc.poll() is None
    assert "Traceback" not in server.log_text()
