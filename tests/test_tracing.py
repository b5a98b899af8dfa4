"""OpenTelemetry traces from a real server, received over OTLP/HTTP by a receiver on loopback in this test
and decoded with opentelemetry-proto; and tracing off costs no import."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from app.core import tracing
from app.storage.store import ModelStore
from tests.helpers import REPO, ServerProcess, free_port, image_bytes

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
tg = pytest.importorskip("tritonclient.grpc")

IMAGES = [
    image_bytes((210, 40, 40), "PNG", seed=1),
    image_bytes((40, 40, 210), "JPEG", seed=2),
    image_bytes((200, 60, 50), "PNG", seed=3),
]
REQUEST_TREE = {"receive": 1, "decode": 3, "queue wait": 1, "inference": 1, "head": 1, "encode": 1}


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int
    attributes: dict[str, object]
    links: list[tuple[str, str]]
    start: int
    end: int
    service: str


class Receiver:
    """An OTLP/HTTP traces endpoint (``POST /v1/traces``, protobuf) on a loopback port."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                if ok:
                    receiver.add(body)
                reply = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, body: bytes) -> None:
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    span = Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind, attrs,
                                [(link.trace_id.hex(), link.span_id.hex()) for link in s.links], s.start_time_unix_nano,
                                s.end_time_unix_nano, service)  # fmt: skip
                    with self.lock:
                        self.spans.append(span)

    def wait_for(self, trace_id: str, count: int, timeout: float = 20) -> list[Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{len(found)} spans of trace {trace_id} after {timeout}s: {[s.name for s in found]}")

    def by_id(self, span_id: str, timeout: float = 20) -> Span:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for s in self.spans:
                    if s.span_id == span_id:
                        return s
            time.sleep(0.05)
        raise AssertionError(f"no span {span_id}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, receiver: Receiver, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}  # export every 50 ms
    return module_server_factory(tiny_store, env=otel, default_head="colors", grpc_port=free_port(), max_queue_delay_ms=150)


def v2_body(images: list[bytes]) -> dict:
    import base64

    return {
        "inputs": [
            {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": [base64.b64encode(b).decode() for b in images]}
        ]
    }


def parse_traceparent(value: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and int(flags, 16) & 1  # sampled
    return trace_id, span_id


def grpc_infer(
    server: ServerProcess, images: list[bytes], headers: dict[str, str] | None = None
) -> tuple[object, dict[str, str]]:
    """A ModelInfer through tritonclient.grpc's stub, keeping the initial metadata (the response headers)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="colors")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in images))
    with grpc.insecure_channel(f"127.0.0.1:{server.env['TLSERVE_GRPC_PORT']}") as channel:
        response, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, timeout=30, metadata=list((headers or {}).items())
        )
    return response, dict(call.initial_metadata())


def assert_request_tree(receiver: Receiver, trace_id: str, root_span_id: str, root_name: str) -> list[Span]:
    spans = receiver.wait_for(trace_id, 1 + sum(REQUEST_TREE.values()))
    root = next(s for s in spans if s.span_id == root_span_id)
    assert root.name == root_name and root.kind == 2 and root.service == "tlserve"  # SPAN_KIND_SERVER
    children = [s for s in spans if s.parent == root.span_id]
    names = {n: sum(1 for s in children if s.name == n) for n in REQUEST_TREE}
    assert names == REQUEST_TREE, [s.name for s in children]
    for s in children:
        assert root.start <= s.start <= s.end <= root.end, s.name
    order = {n: min(s.start for s in children if s.name == n) for n in REQUEST_TREE}
    assert sorted(order, key=order.get) == list(REQUEST_TREE)  # receive → decode → queue wait → inference → head → encode
    assert sorted(s.attributes["tlserve.image.index"] for s in children if s.name == "decode") == [0, 1, 2]
    inference = next(s for s in children if s.name == "inference")
    assert inference.attributes["tlserve.images"] == 3 and inference.attributes["tlserve.provider"] == "CPUExecutionProvider"
    (batch_trace, batch_id), = inference.links  # fmt: skip
    batch = receiver.by_id(batch_id)
    assert batch.name == "batch" and batch.trace_id == batch_trace != trace_id and batch.parent == ""
    assert batch.attributes["tlserve.batch.size"] >= 3 and batch.attributes["tlserve.precision"] == "fp32"
    assert batch.attributes["tlserve.provider"] == "CPUExecutionProvider"
    assert (trace_id, root.span_id) in batch.links  # and the batch links back to every request it served
    head = next(s for s in children if s.name == "head")
    assert head.attributes["tlserve.head"] == "colors"
    return spans


def test_http_request_span_tree(server: ServerProcess, receiver: Receiver) -> None:
    response = httpx.post(f"{server.url}/v2/models/colors/infer", json=v2_body(IMAGES), headers={"X-Request-ID": "nginx-abc"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "nginx-abc"  # the request id keeps its meaning
    trace_id, span_id = parse_traceparent(response.headers["traceparent"])
    spans = assert_request_tree(receiver, trace_id, span_id, "POST /v2/models/{name}/infer")
    root = next(s for s in spans if s.span_id == span_id)
    assert root.parent == "" and root.attributes["http.route"] == "/v2/models/{name}/infer"
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["tlserve.request_id"] == "nginx-abc"
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{") and '"nginx-abc"' in x]
    assert [x["trace_id"] for x in lines] == [trace_id]  # the log line leads to its trace


def test_grpc_request_span_tree(server: ServerProcess, receiver: Receiver) -> None:
    response, metadata = grpc_infer(server, IMAGES, {"x-request-id": "grpc-abc"})
    assert len(response.outputs) == 4 and metadata["x-request-id"] == "grpc-abc"  # the head has familiarity data
    trace_id, span_id = parse_traceparent(metadata["traceparent"])
    spans = assert_request_tree(receiver, trace_id, span_id, "inference.GRPCInferenceService/ModelInfer")
    root = next(s for s in spans if s.span_id == span_id)
    assert root.attributes["rpc.system"] == "grpc" and root.attributes["rpc.method"] == "ModelInfer"
    assert root.attributes["rpc.grpc.status_code"] == 0
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{") and '"grpc-abc"' in x]
    assert [x["trace_id"] for x in lines] == [trace_id]


def test_incoming_traceparent_is_continued(server: ServerProcess, receiver: Receiver) -> None:
    for front in ("http", "grpc"):
        trace_id, parent = np.random.default_rng().bytes(16).hex(), np.random.default_rng().bytes(8).hex()
        incoming = f"00-{trace_id}-{parent}-01"
        if front == "http":
            response = httpx.post(
                f"{server.url}/v2/models/colors/infer", json=v2_body(IMAGES[:1]), headers={"traceparent": incoming}
            )
            assert response.status_code == 200
            outgoing = response.headers["traceparent"]
        else:
            _, metadata = grpc_infer(server, IMAGES[:1], {"traceparent": incoming})
            outgoing = metadata["traceparent"]
        got_trace, span_id = parse_traceparent(outgoing)
        assert got_trace == trace_id and span_id != parent, front
        root = receiver.by_id(span_id)
        assert root.trace_id == trace_id and root.parent == parent, front
        assert len(receiver.wait_for(trace_id, 1 + sum(REQUEST_TREE.values()) - 2)) >= 7  # one image: one decode


def test_one_batch_span_serves_and_links_concurrent_requests(server: ServerProcess, receiver: Receiver) -> None:
    async def two() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:  # max_queue_delay_ms=150: both land in one batch
            return await asyncio.gather(*(c.post(f"{server.url}/v2/models/colors/infer", json=v2_body([b])) for b in IMAGES[:2]))

    roots = [parse_traceparent(r.headers["traceparent"]) for r in asyncio.run(two())]
    links = []
    for trace_id, _ in roots:
        spans = receiver.wait_for(trace_id, 7)
        links += [link for s in spans if s.name == "inference" for link in s.links]
    assert len(links) == 2 and links[0] == links[1]  # both requests link to the same batch span
    batch = receiver.by_id(links[0][1])
    assert batch.attributes["tlserve.batch.requests"] == 2 and batch.attributes["tlserve.batch.size"] == 2
    assert set(batch.links) == set(roots)


def test_grpc_error_marks_the_span(server: ServerProcess, receiver: Receiver) -> None:
    client = tg.InferenceServerClient(url=f"127.0.0.1:{server.env['TLSERVE_GRPC_PORT']}")
    try:
        trace_id, parent = "ab" * 16, "cd" * 8
        with pytest.raises(Exception, match="no_such_head"):
            client.get_model_metadata("no_such_head", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    finally:
        client.close()
    (root,) = receiver.wait_for(trace_id, 1)
    assert (
        root.name == "inference.GRPCInferenceService/ModelMetadata" and root.attributes["rpc.grpc.status_code"] == 5
    )  # NOT_FOUND


def test_sampler_decides_and_spans_are_flushed_at_shutdown(
    tiny_store: ModelStore, receiver: Receiver, server_factory: Callable[..., ServerProcess]
) -> None:
    """``parentbased_always_off``: only requests whose caller sampled are traced; and with a minute between
    exports, the spans still arrive, because SIGTERM flushes them once the server has drained."""
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_SAMPLER": "parentbased_always_off",
            "OTEL_BSP_SCHEDULE_DELAY": "60000"}  # fmt: skip
    server = server_factory(tiny_store, env=otel, default_head="colors")
    url = f"{server.url}/v2/models/colors/infer"
    unsampled = httpx.post(url, json=v2_body(IMAGES[:1]), headers={"X-Request-ID": "not-sampled"})
    _, trace_id, _, flags = unsampled.headers["traceparent"].split("-")
    assert unsampled.status_code == 200 and int(flags, 16) & 1 == 0  # propagated, not sampled
    wanted = "ef" * 16
    sampled = httpx.post(url, json=v2_body(IMAGES[:1]), headers={"traceparent": f"00-{wanted}-{'12' * 8}-01"})
    assert sampled.status_code == 200 and parse_traceparent(sampled.headers["traceparent"])[0] == wanted
    time.sleep(0.5)
    with receiver.lock:
        assert not [x for x in receiver.spans if x.trace_id in (wanted, trace_id)]  # nothing exported yet
    server.terminate()
    assert server.proc is not None and server.proc.wait(30) in (0, -15)
    assert len(receiver.wait_for(wanted, 7, timeout=5)) == 7
    with receiver.lock:
        assert not [x for x in receiver.spans if x.trace_id == trace_id]
    line = next(json.loads(x) for x in server.log_text().splitlines() if '"not-sampled"' in x)
    assert "trace_id" not in line  # a log line names only traces that exist


# --- off by default, and free -------------------------------------------------------------------
def test_off_imports_no_opentelemetry_of_its_own(tiny_store: ModelStore) -> None:
    """Tracing off: tlserve loads no OpenTelemetry module beyond what FastAPI itself imports (FastAPI >= 0.16x
    depends on opentelemetry-api), never the SDK or an exporter, and answers without traceparent."""
    code = (
        "import sys, fastapi\n"
        "before = {m for m in sys.modules if m.startswith('opentelemetry')}\n"
        "from starlette.testclient import TestClient\n"
        "import app.server, app.core.tracing\n"
        "from app.main import create_app\n"
        "from app.core.settings import Settings\n"
        f"s = Settings(model_store={str(tiny_store.root)!r}, default_head='colors', intra_op_threads=1, head_poll_interval_s=0)\n"
        "with TestClient(create_app(s), base_url='http://127.0.0.1') as c:\n"
        "    r = c.post('/v1/classify', content=open(sys.argv[1], 'rb').read(), headers={'content-type': 'image/png'})\n"
        "    assert r.status_code == 200 and 'traceparent' not in r.headers, r.text\n"
        "print(app.core.tracing.enabled, sorted({m for m in sys.modules if m.startswith('opentelemetry')} - before))\n"
    )
    png = tiny_store.root.parent / "off.png"
    png.write_bytes(IMAGES[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {"OTEL_SERVICE_NAME": "x"}  # no endpoint: off
    out = subprocess.run([sys.executable, "-c", code, str(png)], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False []"


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_on_only_with_an_otlp_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


def test_unsupported_protocol_is_refused_before_anything_starts() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(tracing.TracingConfigError, match="http/json"):
        tracing.configure(env)
    assert not tracing.enabled
    assert tracing.protocol({}) == "http/protobuf" and tracing.protocol({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == "grpc"


def test_bad_protocol_stops_the_server_with_a_message(
    tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        server_factory(tiny_store, env=otel, default_head="colors")
    assert "'thrift' is not supported" in str(err.value)
