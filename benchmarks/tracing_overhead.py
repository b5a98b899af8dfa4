"""What OpenTelemetry tracing costs: throughput at concurrency 8, tracing off and on, as ratios in one run.

Three real servers on the real export (one JPEG per request, real photos from ../shared when present):

- ``baseline``: the code before tracing existed (``--baseline REF``, default the parent of the commit
  that added ``app/core/tracing.py``), extracted with ``git archive`` and run on the same model store;
- ``off``: this tree, no OTLP endpoint (the default): the hooks are there, OpenTelemetry's SDK is not;
- ``on``: this tree with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an OTLP/HTTP receiver on loopback
  in this process and ``OTEL_TRACES_SAMPLER=always_on``: every request traced and exported.

The modes are measured in interleaved rounds (baseline, off, on, baseline, off, on, ...) so that drift
of a shared machine hits them alike; the ratios are of the medians. The receiver only stores what it
gets; spans are counted after the run, to check every request really was traced.

    nice -n 10 python -m benchmarks.tracing_overhead [--seconds 15] [--rounds 3] [--baseline REF|none]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from app.bench import _load, free_port, load_payloads, machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cats_vs_dogs" / "val"
OUT = REPO / "benchmarks" / "out"


class Receiver:
    """OTLP/HTTP ``POST /v1/traces`` on loopback: keeps the bodies, answers 200 at once."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> dict[str, int]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        names: dict[str, int] = {}
        for body in self.bodies:
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        names[s.name] = names.get(s.name, 0) + 1
        return names


@contextlib.contextmanager
def server(cwd: Path, env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full.update(
        {"TLSERVE_LOG_LEVEL": "warning", "TLSERVE_HEAD_POLL_INTERVAL_S": "0", "TLSERVE_MODEL_STORE": str(REPO / "model_store")}
    )
    full.update(env)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=cwd, env=full, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server in {cwd} exited: {log.read_text(errors='replace')[-1500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(log.read_text(errors="replace")[-1500:])
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def baseline_tree(ref: str, into: Path) -> Path:
    """``ref``'s tracked files (``git archive``), without touching this checkout."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def hook_cost_us(n: int = 200_000) -> float:
    """Microseconds the tracing hooks of one 1-image request cost when tracing is off (in process)."""
    from app.core import tracing

    assert not tracing.enabled

    def request() -> None:  # the hooks a 1-image /v1/classify passes, in order
        with tracing.span("receive"):
            pass
        tracing.capture()
        fn = tracing.bind(request)
        with tracing.span("decode", {"i": 0}):
            pass
        _ = tracing.enabled, tracing.enabled, fn  # middleware, batcher
        with tracing.span("head", {}):
            pass
        tracing.traceparent()

    t0 = time.perf_counter()
    for _ in range(n):
        request()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--baseline",
        default="auto",
        help="git ref of the code before tracing ('auto': the parent of the commit adding app/core/tracing.py; 'none')",
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not (REPO / "model_store" / "manifest.json").exists():
        print("error: run `tlserve export` first (model_store/manifest.json is absent)", file=sys.stderr)
        return 2
    payloads, source = load_payloads(DATA, 32)
    receiver = Receiver()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
    ref = args.baseline
    if ref == "auto":
        git = ["git", "log", "--diff-filter=A", "--format=%H", "--", "app/core/tracing.py"]
        added = subprocess.run(git, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
        ref = f"{added[-1]}^"
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trees = {"off": (REPO, {}), "on": (REPO, otel)}
        if ref != "none":
            trees = {"baseline": (baseline_tree(ref, Path(tmp)), {}), **trees}
        servers = {
            mode: stack.enter_context(server(cwd, env, args.out / f"tracing_{mode}.log")) for mode, (cwd, env) in trees.items()
        }
        for r in range(args.rounds):
            for mode, (url, pid) in servers.items():
                row = asyncio.run(_load(url, pid, payloads, args.concurrency, args.seconds, warmup=2.0))
                rows.setdefault(mode, []).append(row)
                print(
                    f"round {r + 1} {mode:8s} {row['images_s']:7.2f} img/s  p50 {row['p50_ms']:7.1f} ms  errors {row['errors']}",
                    flush=True,
                )
    time.sleep(1.0)  # the servers flushed their last spans when they stopped
    median = {mode: statistics.median(row["images_s"] for row in mode_rows) for mode, mode_rows in rows.items()}
    cpu = {mode: statistics.median(row["server_cpu_ms_per_image"] for row in mode_rows) for mode, mode_rows in rows.items()}
    spans = receiver.spans()
    result = {
        "machine": machine(),
        "payloads": source,
        "baseline_ref": ref,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "images_s": {mode: [row["images_s"] for row in mode_rows] for mode, mode_rows in rows.items()},
        "median_images_s": median,
        "p50_ms": {mode: statistics.median(row["p50_ms"] for row in mode_rows) for mode, mode_rows in rows.items()},
        "errors": {mode: sum(row["errors"] for row in mode_rows) for mode, mode_rows in rows.items()},
        "on_over_off": round(median["on"] / median["off"], 4),
        "off_over_baseline": round(median["off"] / median["baseline"], 4) if "baseline" in median else None,
        "server_cpu_ms_per_image": cpu,  # the server process's CPU per image: less sensitive to a busy machine
        "cpu_on_over_off": round(cpu["on"] / cpu["off"], 4),
        "cpu_off_over_baseline": round(cpu["off"] / cpu["baseline"], 4) if "baseline" in cpu else None,
        "spans_received": spans,
        "server_spans_received": spans.get("POST /v1/classify", 0),
        "requests_measured_traced_mode": sum(row["requests"] for row in rows["on"]),  # warm-up requests are traced too
        "off_hook_cost_us_per_request": round(hook_cost_us(), 3),
    }
    (args.out / "tracing_overhead.json").write_text(json.dumps(result, indent=2))
    keys = ("median_images_s", "on_over_off", "off_over_baseline", "server_cpu_ms_per_image", "cpu_on_over_off",
            "cpu_off_over_baseline", "errors", "server_spans_received",
            "requests_measured_traced_mode", "off_hook_cost_us_per_request")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
