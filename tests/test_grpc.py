"""The Open Inference Protocol over gRPC, against the real third-party client (tritonclient.grpc) and a
real server process; raw calls use Triton's own generated stubs (never ours: both register the
``inference`` package, and a second look at the wire format is the point)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.storage.store import ModelStore
from deploy.nginx.render import command, write_standalone
from tests.helpers import REPO, ServerProcess, free_port, image_bytes

grpc = pytest.importorskip("grpc")
tg = pytest.importorskip("tritonclient.grpc")
th = pytest.importorskip("tritonclient.http")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

RED, BLUE = (210, 40, 40), (40, 40, 210)
IMAGES = [
    image_bytes(RED, "PNG", size=(40, 36), seed=1),
    image_bytes(BLUE, "JPEG", size=(48, 40), seed=2),
    image_bytes(RED, "JPEG", size=(64, 64), seed=3),
    image_bytes(BLUE, "PNG", size=(33, 57), seed=4),
]
OUTPUTS = ("label", "probabilities", "features")
IMAGES_OK = 'tlserve_images_total{endpoint="infer",head="colors",outcome="ok"}'


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", max_images_per_request=8, grpc_port=free_port())


def grpc_address(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.env['TLSERVE_GRPC_PORT']}"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(url=grpc_address(server))
    yield c
    c.close()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def grpc_input(images: list[bytes], shape: list[int] | None = None) -> tg.InferInput:
    inp = tg.InferInput("image", shape or [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape or [len(images)]))
    return inp


def http_v2(server: ServerProcess, images: list[bytes], head: str = "colors") -> dict[str, np.ndarray]:
    """The same request over HTTP ``/v2`` (tritonclient.http): the answers gRPC must equal."""
    client = th.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
    try:
        inp = th.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_))
        result = client.infer(head, [inp], outputs=[th.InferRequestedOutput(n) for n in OUTPUTS])
        return {n: result.as_numpy(n) for n in OUTPUTS}
    finally:
        client.close()


def metric(server: ServerProcess, line_start: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def raw_request(images: list[bytes] | None = None, **fields: object) -> pb.ModelInferRequest:
    """A ModelInferRequest for colors with ``images`` framed in raw_input_contents, then ``fields``."""
    images = IMAGES[:1] if images is None else images
    request = pb.ModelInferRequest(model_name="colors")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in images))
    for key, value in fields.items():
        setattr(request, key, value)
    return request


def rpc_error(call, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30, **kw)
    return err.value


# --- health and metadata -------------------------------------------------------------------------
def test_health_and_server_metadata(client: tg.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("colors")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "tlserve" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready("no_such_head")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "no_such_head" in err.value.message()


def test_model_metadata_is_the_http_one(client: tg.InferenceServerClient, server: ServerProcess) -> None:
    meta = client.get_model_metadata("colors", as_json=True)
    http = httpx.get(f"{server.url}/v2/models/colors").json()
    for tensors in (meta["inputs"], meta["outputs"], http["inputs"], http["outputs"]):
        for t in tensors:
            t["shape"] = [int(d) for d in t["shape"]]  # protobuf JSON writes int64 as strings
    assert (meta["name"], meta["platform"], meta["inputs"], meta["outputs"]) == (
        http["name"], http["platform"], http["inputs"], http["outputs"],
    )  # fmt: skip
    assert meta["versions"] == ["1"]
    assert client.get_model_metadata("colors", model_version="1").name == "colors"
    for version in ("7", "x"):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("colors", model_version=version)
        assert err.value.status() == ("StatusCode.NOT_FOUND" if version == "7" else "StatusCode.INVALID_ARGUMENT")
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_head")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_health_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- inference -----------------------------------------------------------------------------------
def test_infer_equals_http_v2(client: tg.InferenceServerClient, server: ServerProcess) -> None:
    result = client.infer("colors", [grpc_input(IMAGES)], outputs=[tg.InferRequestedOutput(n) for n in OUTPUTS], request_id="r-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("colors", "1", "r-1")
    expected = http_v2(server, IMAGES)
    labels = result.as_numpy("label")
    assert labels.shape == (4,) and list(labels) == list(expected["label"])
    assert {x.decode() for x in labels} == {"red", "blue"}  # not all one answer
    for name in ("probabilities", "features"):
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == expected[name].shape
        np.testing.assert_array_equal(got, expected[name])  # the same batcher and model: the same floats


def test_default_outputs_and_pinned_version(client: tg.InferenceServerClient) -> None:
    result = client.infer("colors", [grpc_input(IMAGES[:2])], model_version="1")
    names = [o.name for o in result.get_response().outputs]
    assert names == ["label", "probabilities", "familiarity", "in_distribution"]  # as over HTTP: the head has familiarity data
    assert result.as_numpy("features") is None and result.get_response().model_version == "1"
    with pytest.raises(InferenceServerException) as err:
        client.infer("colors", [grpc_input(IMAGES[:1])], model_version="3")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "version 3" in err.value.message()


def test_classification_extension(client: tg.InferenceServerClient, server: ServerProcess) -> None:
    result = client.infer("colors", [grpc_input(IMAGES)], outputs=[tg.InferRequestedOutput("probabilities", class_count=2)])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 2)
    expected = http_v2(server, IMAGES)
    classes = [str(c) for c in httpx.get(f"{server.url}/v1/models/colors").json()["card"]["classes"]]
    for row, label, proba in zip(top, expected["label"], expected["probabilities"], strict=True):
        p, index, name = row[0].decode().split(":")
        assert name == label.decode() and int(index) == classes.index(name)
        assert abs(float(p) - proba.max()) <= 1.5e-6


def test_bytes_contents_and_shape_n_by_1(stub: pb_grpc.GRPCInferenceServiceStub, server: ServerProcess) -> None:
    """``contents.bytes_contents`` (one entry per image) and shape [N, 1], through Triton's own stubs."""
    request = pb.ModelInferRequest(model_name="colors", id="bc")
    t = request.inputs.add(name="image", datatype="BYTES", shape=[3, 1])
    t.contents.bytes_contents.extend(IMAGES[:3])
    request.outputs.add(name="label")
    response, call = stub.ModelInfer.with_call(request, timeout=30, metadata=[("x-request-id", "grpc-req-7")])
    assert response.id == "bc" and [o.name for o in response.outputs] == ["label"]
    blob, labels = response.raw_output_contents[0], []
    while blob:
        n = int.from_bytes(blob[:4], "little")
        labels.append(blob[4 : 4 + n])
        blob = blob[4 + n :]
    assert labels == list(http_v2(server, IMAGES[:3])["label"])
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-req-7"  # a client's request id is echoed


def test_metrics_count_each_image_once_whatever_the_front(client: tg.InferenceServerClient, server: ServerProcess) -> None:
    before = metric(server, IMAGES_OK)
    client.infer("colors", [grpc_input(IMAGES[:3])])
    assert metric(server, IMAGES_OK) - before == 3
    http_v2(server, IMAGES[:2])
    assert metric(server, IMAGES_OK) - before == 5
    route = 'tlserve_request_duration_seconds_count{method="GRPC",route="/inference.GRPCInferenceService/ModelInfer",status="OK"}'
    assert metric(server, route) >= 1


# --- errors --------------------------------------------------------------------------------------
def _two_inputs() -> pb.ModelInferRequest:
    r = raw_request()
    r.inputs.add(name="image", datatype="BYTES", shape=[1])
    return r


def _with_output(name: str, **params: int) -> pb.ModelInferRequest:
    r = raw_request()
    out = r.outputs.add(name=name)
    for key, value in params.items():
        out.parameters[key].int64_param = value
    return r


def _both_contents() -> pb.ModelInferRequest:
    r = raw_request()
    r.inputs[0].contents.bytes_contents.append(IMAGES[0])
    return r


def _no_data() -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="colors")
    r.inputs.add(name="image", datatype="BYTES", shape=[1])
    return r


def _retyped(**changes: object) -> pb.ModelInferRequest:
    r = raw_request()
    for key, value in changes.items():
        if key == "shape":
            del r.inputs[0].shape[:]
            r.inputs[0].shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(r.inputs[0], key, value)
    return r


def _truncated() -> pb.ModelInferRequest:
    r = raw_request()
    r.raw_input_contents[0] = r.raw_input_contents[0][:-5]
    return r


BAD_REQUESTS = {
    "wrong datatype": (_retyped(datatype="FP32"), "BYTES"),
    "wrong input name": (_retyped(name="pixels"), "'image'"),
    "two inputs": (_two_inputs(), "one input"),
    "shape [1, 2]": (_retyped(shape=[1, 2]), "[N, 1]"),
    "shape says 2, 1 element": (_retyped(shape=[2]), "different number of elements"),
    "no images": (_retyped(shape=[0]), "no images"),
    "over max_images_per_request": (raw_request(IMAGES * 3), "max_images_per_request"),
    "unknown output": (_with_output("logits"), "unknown output"),
    "classification on label": (_with_output("label", classification=1), "probabilities output only"),
    "classification 0": (_with_output("probabilities", classification=0), "at least 1"),
    "raw and typed contents": (_both_contents(), "both contents and raw_input_contents"),
    "no data": (_no_data(), "neither raw_input_contents"),
    "truncated framing": (_truncated(), "truncated"),
    "not an image": (raw_request([IMAGES[0], b"this is not an image"]), "element 1"),
    "bad model_version": (raw_request(model_version="latest"), "model_version"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    request, words = BAD_REQUESTS[case]
    err = rpc_error(stub.ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert words in err.details()
    assert dict(err.trailing_metadata())["tlserve-error-code"]  # the stable tlserve code rides along


def test_unknown_model_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    err = rpc_error(stub.ModelInfer, raw_request(model_name="no_such_head"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no_such_head" in err.details()
    assert dict(err.trailing_metadata())["tlserve-error-code"] == "head_not_found"
    err = rpc_error(stub.ModelReady, pb.ModelReadyRequest(name="../etc"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "invalid head name" in err.details()


def test_unknown_method_is_unimplemented(server: ServerProcess) -> None:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics  # Triton has it; the KServe protocol does not
        with pytest.raises(grpc.RpcError) as err:
            stats(pb.ModelStatisticsRequest(name="colors"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- limits: message size and a full queue -------------------------------------------------------
@pytest.fixture(scope="module")
def tight_server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", max_queue_size=1, max_batch_size=1, decode_threads=2,
                                 max_body_bytes=100_000, grpc_port=free_port())  # fmt: skip


def test_message_over_max_body_bytes_is_resource_exhausted(tight_server: ServerProcess) -> None:
    big = image_bytes(RED, "PNG", size=(400, 400), noise=120)  # noisy PNG: over 100 KB
    assert len(big) > 100_000
    with grpc.insecure_channel(grpc_address(tight_server)) as channel:
        err = rpc_error(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, raw_request([big]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "100000" in err.details()


def test_full_queue_is_resource_exhausted_with_a_retry_hint(tight_server: ServerProcess) -> None:
    key = 'tlserve_rejections_total{reason="queue_full"}'
    before = metric(tight_server, key)
    with grpc.insecure_channel(grpc_address(tight_server)) as channel:  # two images never fit a one-image queue
        err = rpc_error(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, raw_request(IMAGES[:2]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_size" in err.details()
    trailers = dict(err.trailing_metadata())
    assert (trailers["tlserve-error-code"], trailers["retry-after"], trailers["grpc-retry-pushback-ms"]) == (
        "queue_full",
        "1",
        "1000",
    )
    assert metric(tight_server, key) - before == 1

    async def wave() -> list[grpc.StatusCode]:  # concurrent single images: the queue overflows for real
        async with grpc.aio.insecure_channel(grpc_address(tight_server)) as ch:
            call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            results = await asyncio.gather(
                *(call(raw_request([IMAGES[i % 4]]), timeout=60) for i in range(24)), return_exceptions=True
            )
        return [r.code() if isinstance(r, grpc.RpcError) else grpc.StatusCode.OK for r in results]

    codes: list[grpc.StatusCode] = []
    for _ in range(5):  # until it really overflowed at least once
        codes = asyncio.run(wave())
        if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
            break
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


# --- API keys ------------------------------------------------------------------------------------
def test_api_keys_from_metadata(server_factory, tiny_store: ModelStore) -> None:
    server = server_factory(
        tiny_store, default_head="colors", api_keys="sesame,other", admin_keys="boss", grpc_port=str(free_port())
    )
    client = tg.InferenceServerClient(url=grpc_address(server))
    try:
        assert client.is_server_live() and client.is_server_ready()  # open_probes
        with grpc.insecure_channel(grpc_address(server)) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        for call in (
            lambda h: client.get_server_metadata(headers=h),
            lambda h: client.get_model_metadata("colors", headers=h),
            lambda h: client.is_model_ready("colors", headers=h),
            lambda h: client.infer("colors", [grpc_input(IMAGES[:1])], headers=h),
        ):
            for wrong in (None, {"authorization": "Bearer nope"}, {"x-api-key": "sesam"}):
                with pytest.raises(InferenceServerException) as err:
                    call(wrong)
                assert err.value.status() == "StatusCode.UNAUTHENTICATED" and "API key" in err.value.message()
        assert client.is_model_ready("colors", headers={"authorization": "Bearer sesame"})
        for key in ({"x-api-key": "other"}, {"authorization": "Bearer boss"}):  # an admin key serves inference too
            assert client.infer("colors", [grpc_input(IMAGES[:1])], headers=key).as_numpy("label").shape == (1,)
    finally:
        client.close()


# --- readiness, drain, start-up ------------------------------------------------------------------
def test_not_ready_is_unavailable(server_factory, tiny_store: ModelStore, tmp_path: Path) -> None:
    # the extractor and no head at all: nothing to serve (a store with other heads would be ready with them)
    bare = ModelStore(tmp_path / "bare")
    bare.heads_dir.mkdir(parents=True)
    for path in (tiny_store.manifest_path, *tiny_store.root.glob("*.onnx")):
        shutil.copy(path, bare.root / path.name)
    server = server_factory(bare, wait_ready=False, default_head="missing_head", grpc_port=str(free_port()))
    client = tg.InferenceServerClient(url=grpc_address(server))
    try:
        assert client.is_server_live() and not client.is_server_ready()
        with grpc.insecure_channel(grpc_address(server)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(InferenceServerException) as err:
            client.infer("colors", [grpc_input(IMAGES[:1])])
        assert err.value.status() == "StatusCode.UNAVAILABLE" and "missing_head" in err.value.message()
    finally:
        client.close()


def test_sigterm_turns_not_serving_then_closes_the_listener(server_factory, tiny_store: ModelStore) -> None:
    server = server_factory(tiny_store, default_head="colors", shutdown_delay_s="3", grpc_port=str(free_port()))
    client = tg.InferenceServerClient(url=grpc_address(server))
    try:
        with grpc.insecure_channel(grpc_address(server)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            server.terminate()
            deadline = time.monotonic() + 5
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
                time.sleep(0.05)
        assert not client.is_server_ready()
        result = client.infer("colors", [grpc_input(IMAGES[:1])])  # still accepted during shutdown_delay_s
        assert result.as_numpy("label").shape == (1,)
        assert server.proc.wait(30) in (0, -15)
    finally:
        client.close()
    fresh = tg.InferenceServerClient(url=grpc_address(server))
    try:
        with pytest.raises(InferenceServerException) as err:
            fresh.is_server_live()
        assert err.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        fresh.close()
    assert "Traceback" not in server.log_text()


def test_grpc_port_in_use_fails_before_the_model_loads(server_factory, tiny_store: ModelStore) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"server exited with [1-9]") as err:
            server_factory(tiny_store, default_head="colors", grpc_port=port)
    log = str(err.value)
    assert f"127.0.0.1:{port} (grpc_port)" in log and "warm-up" not in log


def test_grpc_is_off_and_not_imported_by_default(tiny_store: ModelStore) -> None:
    code = (
        "import sys; from starlette.testclient import TestClient; from app.main import create_app; import app.server; "
        "from app.core.settings import Settings; "
        f"s = Settings(model_store={str(tiny_store.root)!r}, default_head='colors', intra_op_threads=1, head_poll_interval_s=0); "
        "c = TestClient(create_app(s), base_url='http://127.0.0.1').__enter__(); assert c.get('/readyz').status_code == 200; "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_health')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_error_class_has_a_grpc_code() -> None:
    import app.core.errors as errors
    from app.grpc.status import CODES, code_for

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TlserveError)]
    assert len(classes) > 20
    expected = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "FAILED_PRECONDITION",
                413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                500: "INTERNAL"}  # fmt: skip
    for cls in classes:
        code = code_for(cls("x")).name
        if cls.status_code == 503:
            assert code == ("RESOURCE_EXHAUSTED" if issubclass(cls, errors.QueueFull) else "UNAVAILABLE"), cls
        else:
            assert code == expected[cls.status_code], cls
    assert set(CODES) <= set(classes)


# --- the real model ------------------------------------------------------------------------------
@pytest.mark.e2e
def test_real_photos_equal_http_then_drain_under_load(server_factory, real_store: ModelStore, shared_data: Path) -> None:
    """The OIP HTTP test's photos give the same answers over gRPC; then SIGTERM with RPCs in flight loses none."""
    head = "cats_vs_dogs"
    if head not in real_store.heads.names():
        pytest.skip(f"model_store/ has no {head!r} head")
    files = sorted((shared_data / "val" / "cat").glob("*.jpg"))[:3] + sorted((shared_data / "val" / "dog").glob("*.jpg"))[:3]
    photos = [f.read_bytes() for f in files]  # the photos of tests/test_oip.py's real-model test
    server = server_factory(real_store, default_head=head, shutdown_delay_s="0.5", drain_timeout_s="60", max_batch_size="4",
                            grpc_port=str(free_port()))  # fmt: skip
    client = tg.InferenceServerClient(url=grpc_address(server))
    try:
        assert client.is_model_ready(head)
        result = client.infer(
            head, [grpc_input(photos)], outputs=[tg.InferRequestedOutput(n) for n in OUTPUTS], client_timeout=120
        )
        expected = http_v2(server, photos, head)
        assert [x.decode() for x in result.as_numpy("label")] == ["cat"] * 3 + ["dog"] * 3
        assert list(result.as_numpy("label")) == list(expected["label"])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.as_numpy("features"), expected["features"], rtol=1e-5, atol=1e-5)
    finally:
        client.close()

    async def scenario() -> tuple[list[object], grpc.StatusCode | None]:
        async with grpc.aio.insecure_channel(grpc_address(server)) as ch:
            call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            load = asyncio.gather(*(call(raw_request((photos * 2)[i : i + 2], model_name=head), timeout=120) for i in range(0, 8, 2)),
                                  return_exceptions=True)  # fmt: skip
            async with httpx.AsyncClient() as c:  # wait until the server really holds the RPCs
                for _ in range(400):
                    text = (await c.get(f"{server.url}/metrics")).text
                    if next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("tlserve_in_flight_requests ")) >= 3:
                        break
                    await asyncio.sleep(0.02)
            server.terminate()
            await asyncio.sleep(1.5)  # past shutdown_delay_s: the listener is closed, the RPCs still run
            late = None
            async with grpc.aio.insecure_channel(grpc_address(server)) as fresh:
                try:
                    await pb_grpc.GRPCInferenceServiceStub(fresh).ServerLive(pb.ServerLiveRequest(), timeout=5)
                except grpc.RpcError as exc:
                    late = exc.code()
            return await load, late

    responses, late = asyncio.run(scenario())
    assert late == grpc.StatusCode.UNAVAILABLE  # a new RPC after the listener closed
    assert all(isinstance(r, pb.ModelInferResponse) for r in responses), [
        r for r in responses if not isinstance(r, pb.ModelInferResponse)
    ]
    assert server.proc.wait(60) in (0, -15)
    assert "Traceback" not in server.log_text()


# --- through the documented load balancer: real nginx, deploy/nginx/tlserve.conf's gRPC block -------
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed: `apt-get install -y nginx` (.ci/run installs it)")
def test_nginx_grpc_route_balances_rpcs_and_skips_a_stopped_replica(
    server_factory, tiny_store: ModelStore, tmp_path: Path
) -> None:
    replicas = [server_factory(tiny_store, default_head="colors", grpc_port=free_port()) for _ in range(2)]
    http_port, grpc_port = free_port(), free_port()
    main = write_standalone(tmp_path / "nginx", [f"127.0.0.1:{r.port}" for r in replicas], f"127.0.0.1:{http_port}",
                            grpc_upstreams=[grpc_address(r) for r in replicas], grpc_listen=f"127.0.0.1:{grpc_port}")  # fmt: skip
    assert NGINX is not None
    with (tmp_path / "nginx.out").open("wb") as out:
        nginx = subprocess.Popen(command(NGINX, main), stdout=out, stderr=subprocess.STDOUT)
    try:
        lb = f"127.0.0.1:{grpc_port}"
        client = tg.InferenceServerClient(url=lb)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                assert time.monotonic() < deadline, (tmp_path / "nginx.out").read_text()
                time.sleep(0.1)
        route = (
            'tlserve_request_duration_seconds_count{method="GRPC",route="/inference.GRPCInferenceService/ModelInfer",status="OK"}'
        )
        for i in range(12):  # one client channel: nginx still spreads its RPCs over both replicas
            assert client.infer("colors", [grpc_input(IMAGES[i % 4 : i % 4 + 1])]).as_numpy("label").shape == (1,)
        served = [metric(r, route) for r in replicas]
        assert sum(served) == 12 and min(served) >= 3, served
        with grpc.insecure_channel(lb) as channel:  # the request id: nginx's or the client's, exactly once
            _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(raw_request(), timeout=30,
                                                                                  metadata=[("x-request-id", "via-nginx-1")])  # fmt: skip
        assert [v for k, v in call.initial_metadata() if k == "x-request-id"] == ["via-nginx-1"]

        replicas[0].terminate()  # drains and exits; nginx skips the refused replica
        assert replicas[0].proc is not None and replicas[0].proc.wait(30) in (0, -15)
        before = metric(replicas[1], route)
        for i in range(8):
            assert client.infer("colors", [grpc_input(IMAGES[i % 4 : i % 4 + 1])]).as_numpy("label").shape == (1,)
        assert metric(replicas[1], route) - before == 8

        replicas[1].terminate()
        assert replicas[1].proc is not None and replicas[1].proc.wait(30) in (0, -15)
        with pytest.raises(InferenceServerException) as err:  # nobody left: a gRPC status from nginx itself
            client.infer("colors", [grpc_input(IMAGES[:1])])
        assert err.value.status() == "StatusCode.UNAVAILABLE" and "no tlserve replica" in err.value.message()
        client.close()
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
