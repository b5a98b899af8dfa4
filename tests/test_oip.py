"""The Open Inference Protocol (/v2) against the real third-party client, tritonclient, and by hand."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core.settings import DEFAULT_MAX_BODY_BYTES
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes

th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

RED, BLUE = (210, 40, 40), (40, 40, 210)
IMAGES = [
    image_bytes(RED, "PNG", size=(40, 36), seed=1),
    image_bytes(BLUE, "JPEG", size=(48, 40), seed=2),
    image_bytes(RED, "JPEG", size=(64, 64), seed=3),
    image_bytes(BLUE, "PNG", size=(33, 57), seed=4),
]


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", max_images_per_request=8)


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[th.InferenceServerClient]:
    client = th.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def bytes_input(images: list[bytes], binary: bool, shape: list[int] | None = None) -> th.InferInput:
    inp = th.InferInput("image", shape or [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(b).decode() for b in images]
    inp.set_data_from_numpy(np.array(values, dtype=np.object_).reshape(shape or [len(images)]), binary_data=binary)
    return inp


def v1_classify(server: ServerProcess, images: list[bytes]) -> list[dict]:
    files = [("files", (f"img{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = httpx.post(server.url + "/v1/classify", files=files, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def v1_embed(server: ServerProcess, images: list[bytes]) -> np.ndarray:
    files = [("files", (f"img{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = httpx.post(server.url + "/v1/embed", files=files, timeout=30)
    assert response.status_code == 200, response.text
    return np.array([r["embedding"] for r in response.json()["results"]], np.float32)


def head_classes(server: ServerProcess, head: str = "colors") -> list[str]:
    return [str(c) for c in httpx.get(f"{server.url}/v1/models/{head}").json()["card"]["classes"]]


def assert_same_as_v1(results: list[dict], labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> None:
    assert [r["label"] for r in results] == [x.decode() if isinstance(x, bytes) else x for x in labels]
    expected = np.array([[r["probabilities"][c] for c in classes] for r in results], np.float32)
    assert proba.dtype == np.float32 and proba.shape == expected.shape
    np.testing.assert_allclose(proba, expected, atol=1.5e-6, rtol=0)


# --- tritonclient --------------------------------------------------------------------------------
def test_health_and_server_metadata(triton: th.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "tlserve"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert triton.is_model_ready("colors")
    assert not triton.is_model_ready("no_such_head")


def test_model_metadata(triton: th.InferenceServerClient, server: ServerProcess) -> None:
    meta = triton.get_model_metadata("colors")
    assert meta["name"] == "colors" and meta["platform"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    dim = httpx.get(server.url + "/v1/info").json()["extractor"]["feature_dim"]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "features", "datatype": "FP32", "shape": [-1, dim]},
        {"name": "familiarity", "datatype": "FP32", "shape": [-1]},  # the head has familiarity data
        {"name": "in_distribution", "datatype": "BOOL", "shape": [-1]},
    ]
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no_such_head")
    assert err.value.status() == "404"


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_equals_v1(triton: th.InferenceServerClient, server: ServerProcess, binary_in: bool, binary_out: bool) -> None:
    outputs = [th.InferRequestedOutput(name, binary_data=binary_out) for name in ("label", "probabilities", "features")]
    result = triton.infer("colors", [bytes_input(IMAGES, binary_in)], outputs=outputs, request_id="req-1")
    response = result.get_response()
    assert response["model_name"] == "colors" and response["id"] == "req-1"
    assert all(("binary_data_size" in (o.get("parameters") or {})) == binary_out for o in response["outputs"])
    labels, proba, feats = (result.as_numpy(n) for n in ("label", "probabilities", "features"))
    assert labels.shape == (4,) and proba.shape == (4, 2)
    assert_same_as_v1(v1_classify(server, IMAGES), labels, proba, head_classes(server))
    assert {x.decode() if isinstance(x, bytes) else x for x in labels} == {"red", "blue"}  # not all one answer
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, v1_embed(server, IMAGES), rtol=1e-5, atol=1e-6)


def test_default_outputs_are_label_and_probabilities_in_binary(triton: th.InferenceServerClient, server: ServerProcess) -> None:
    result = triton.infer("colors", [bytes_input(IMAGES[:2], binary=True)])  # no outputs: tritonclient asks binary_data_output
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["label", "probabilities", "familiarity", "in_distribution"]  # the head has familiarity data
    assert result.as_numpy("features") is None
    v1 = v1_classify(server, IMAGES[:2])
    verdict = result.as_numpy("in_distribution")
    assert verdict.dtype == np.bool_ and verdict.tolist() == [r["in_distribution"] for r in v1]
    np.testing.assert_allclose(result.as_numpy("familiarity"), [r["familiarity"] for r in v1], atol=1e-5)
    assert_same_as_v1(
        v1_classify(server, IMAGES[:2]), result.as_numpy("label"), result.as_numpy("probabilities"), head_classes(server)
    )


def test_shape_n_by_1_and_gzip_request(triton: th.InferenceServerClient, server: ServerProcess) -> None:
    outputs = [th.InferRequestedOutput("label", binary_data=False)]
    result = triton.infer(
        "colors", [bytes_input(IMAGES, True, shape=[4, 1])], outputs=outputs, request_compression_algorithm="gzip"
    )
    assert list(result.as_numpy("label")) == [r["label"] for r in v1_classify(server, IMAGES)]


def test_classification_extension(triton: th.InferenceServerClient, server: ServerProcess) -> None:
    outputs = [th.InferRequestedOutput("probabilities", binary_data=True, class_count=2)]
    result = triton.infer("colors", [bytes_input(IMAGES, True)], outputs=outputs)
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 2)
    for row, expected in zip(top, v1_classify(server, IMAGES), strict=True):
        first = row[0].decode().split(":")
        assert first[2] == expected["label"] and first[1] == str(head_classes(server).index(expected["label"]))
        assert abs(float(first[0]) - expected["confidence"]) <= 1.5e-6
        assert float(first[0]) >= float(row[1].decode().split(":")[0])


def test_errors_through_tritonclient(triton: th.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        triton.infer("no_such_head", [bytes_input(IMAGES[:1], True)])
    assert err.value.status() == "404" and "no_such_head" in err.value.message()

    with pytest.raises(InferenceServerException) as err:
        triton.infer("colors", [bytes_input([IMAGES[0], b"this is not an image"], True)])
    assert err.value.status() in ("415", "422") and "element 1" in err.value.message()

    wrong = th.InferInput("image", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as err:
        triton.infer("colors", [wrong])
    assert err.value.status() == "400" and "BYTES" in err.value.message()


# --- by hand: the wire format ------------------------------------------------------------------
def infer_url(server: ServerProcess, model: str = "colors") -> str:
    return f"{server.url}/v2/models/{model}/infer"


def json_request(images: list[bytes], **extra: object) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(b).decode() for b in images]}], **extra}  # fmt: skip


def test_plain_json_form(server: ServerProcess) -> None:
    body = json_request(IMAGES[:2], id="abc", outputs=[{"name": "label"}, {"name": "probabilities"}])
    response = httpx.post(infer_url(server), json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["id"] == "abc" and doc["model_name"] == "colors"
    label, proba = doc["outputs"]
    expected = v1_classify(server, IMAGES[:2])
    assert label == {"name": "label", "datatype": "BYTES", "shape": [2], "data": [r["label"] for r in expected]}
    assert proba["datatype"] == "FP32" and proba["shape"] == [2, 2] and len(proba["data"]) == 4
    assert_same_as_v1(expected, np.array(label["data"]), np.array(proba["data"], np.float32).reshape(2, 2), head_classes(server))


def test_hand_framed_binary_both_ways(server: ServerProcess) -> None:
    framed = b"".join(struct.pack("<I", len(b)) + b for b in IMAGES[:3])
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(framed)}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"},
                    {"name": "features", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    response = httpx.post(
        infer_url(server), content=header + framed, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert response.status_code == 200, response.text
    n = int(response.headers["inference-header-content-length"])
    doc, rest = json.loads(response.content[:n]), response.content[n:]
    label, proba, feats = doc["outputs"]
    assert "data" not in label and "data" in proba and "data" not in feats  # per-output binary_data
    size = label["parameters"]["binary_data_size"]
    blob, rest = rest[:size], rest[size:]
    labels, off = [], 0
    while off < len(blob):
        (k,) = struct.unpack_from("<I", blob, off)
        labels.append(blob[off + 4 : off + 4 + k].decode())
        off += 4 + k
    features = np.frombuffer(rest, "<f4").reshape(feats["shape"])
    assert len(rest) == feats["parameters"]["binary_data_size"]
    expected = v1_classify(server, IMAGES[:3])
    assert_same_as_v1(expected, np.array(labels), np.array(proba["data"], np.float32).reshape(3, 2), head_classes(server))
    np.testing.assert_allclose(features, v1_embed(server, IMAGES[:3]), rtol=1e-5, atol=1e-6)


def one_input(changes: dict | None = None, **top: object) -> dict:
    """A JSON request with one input (``"hello"`` in base64 unless changed)."""
    base = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}
    return {"inputs": [{**base, **(changes or {})}], **top}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (one_input({"data": ["%%%not base64"]}), 400, "element 0"),
        (one_input({"shape": [2]}), 400, "shape"),
        (one_input({"data": [5]}), 400, "base64 string"),
        (one_input({"shape": [1, 2], "data": ["a", "b"]}), 400, "[N, 1]"),
        (one_input({"name": "pixels"}), 400, "image"),
        (one_input({"datatype": "UINT8", "data": [1]}), 400, "BYTES"),
        (one_input({"data": None}), 400, "neither data"),
        (one_input({"data": None, "parameters": {"binary_data_size": 4}}), 400, "binary_data_size"),
        (one_input({"shape": [0], "data": []}), 400, "no images"),
        (one_input({"shape": [9], "data": ["a"] * 9}), 413, "max_images_per_request"),
        (one_input(outputs=[{"name": "logits"}]), 400, "unknown output"),
        (one_input(outputs=[{"name": "label"}, {"name": "label"}]), 400, "twice"),
        (one_input(parameters={"binary_data_output": "yes"}), 400, "binary_data_output"),
        (one_input(outputs=[{"name": "label", "parameters": {"classification": 1}}]), 400, "classification"),
        (one_input(id=7), 400, "id"),
        ({"inputs": []}, 400, "one input"),
        ({"inputs": "nope"}, 400, "inputs"),
        ([1, 2], 400, "invalid inference request"),
        (one_input(), 415, "element 0"),  # valid base64 of b"hello": not an image
    ],
)
def test_bad_requests_get_oip_errors(server: ServerProcess, body: dict, status: int, words: str) -> None:
    response = httpx.post(infer_url(server), json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and words in error


def test_bad_binary_framing(server: ServerProcess) -> None:
    header = json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]})
    cases = [
        (header.encode() + struct.pack("<I", 100) + b"abcd", str(len(header)), "truncated"),  # length beyond the data
        (header.encode() + b"x" * 8, "999999", "Inference-Header-Content-Length"),  # header longer than the body
        (header.encode() + b"x" * 8, "twelve", "not a number"),
        (header.encode() + b"x" * 7, str(len(header)), "binary_data_size"),  # size does not match what follows
        (header.encode()[:-3] + b"x" * 8, str(len(header) - 3), "not valid JSON"),
    ]
    for content, length, words in cases:
        response = httpx.post(infer_url(server), content=content, headers={"Inference-Header-Content-Length": length})
        assert response.status_code == 400, (words, response.text)
        assert words in response.json()["error"]
    bomb = gzip.compress(b" " * (DEFAULT_MAX_BODY_BYTES + 1))  # inflates past max_body_bytes
    response = httpx.post(infer_url(server), content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "max_decompressed_bytes" in response.json()["error"]
    response = httpx.post(infer_url(server), content=b"{}", headers={"Content-Encoding": "br"})
    assert response.status_code == 415


def test_unknown_model_everywhere_is_404(server: ServerProcess) -> None:
    for method, path in [("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"), ("POST", "/v2/models/nope/infer")]:
        response = httpx.request(method, server.url + path, json=json_request(IMAGES[:1]))
        assert response.status_code == 404 and "nope" in response.json()["error"], path


def test_metrics_count_oip_work(server: ServerProcess) -> None:
    assert httpx.post(infer_url(server), json=json_request(IMAGES[:2])).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    ok = [
        line for line in text.splitlines() if line.startswith('tlserve_images_total{endpoint="infer",head="colors",outcome="ok"}')
    ]
    assert ok and float(ok[0].split()[-1]) >= 2
    assert 'route="/v2/models/{name}/infer"' in text


def test_openapi_documents_v2(server: ServerProcess) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    expected = {
        ("/v2", "get"): "oip_server_metadata",
        ("/v2/health/live", "get"): "oip_server_live",
        ("/v2/health/ready", "get"): "oip_server_ready",
        ("/v2/models/{name}", "get"): "oip_model_metadata",
        ("/v2/models/{name}/ready", "get"): "oip_model_ready",
        ("/v2/models/{name}/infer", "post"): "oip_model_infer",
    }
    for key, op_id in expected.items():
        assert ops[key]["operationId"] == op_id
        assert "$ref" in ops[key]["responses"]["200"]["content"]["application/json"]["schema"]
    infer = ops[("/v2/models/{name}/infer", "post")]
    request_schema = infer["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema["required"] == ["inputs"] and "$ref" not in json.dumps(request_schema)
    assert "application/octet-stream" in infer["requestBody"]["content"]
    schemas = doc["components"]["schemas"]
    refs = {r.split("/")[-1] for k, op in ops.items() if k[0].startswith("/v2") for r in _refs(op)}
    assert refs <= set(schemas), refs - set(schemas)
    assert {"InferenceResponse", "ModelMetadata", "ServerMetadata", "OipError"} <= refs


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# --- auth and readiness ------------------------------------------------------------------------
def test_api_keys_guard_v2_but_not_its_health(server_factory, tiny_store: ModelStore) -> None:
    server = server_factory(tiny_store, default_head="colors", api_keys="sesame")
    triton = th.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert triton.is_server_live() and triton.is_server_ready()  # open_probes
        with pytest.raises(InferenceServerException) as err:
            triton.get_server_metadata()
        assert err.value.status() == "401"
        with pytest.raises(InferenceServerException) as err:
            triton.get_model_metadata("colors")
        assert err.value.status() == "401"
        with pytest.raises(InferenceServerException) as err:
            triton.infer("colors", [bytes_input(IMAGES[:1], True)])
        assert err.value.status() == "401"
        assert not triton.is_model_ready("colors")
        keyed = {"Authorization": "Bearer sesame"}
        assert triton.get_model_metadata("colors", headers=keyed)["name"] == "colors"
        assert triton.is_model_ready("colors", headers=keyed)
        result = triton.infer("colors", [bytes_input(IMAGES[:1], True)], headers=keyed)
        assert result.as_numpy("label").shape == (1,)
    finally:
        triton.close()


def test_health_ready_turns_false_while_draining(server_factory, tiny_store: ModelStore) -> None:
    server = server_factory(tiny_store, default_head="colors", shutdown_delay_s="20")
    triton = th.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert triton.is_server_ready()
        server.terminate()  # SIGTERM: not ready at once, still answering for shutdown_delay_s
        for _ in range(100):
            response = httpx.get(server.url + "/v2/health/ready")
            if response.status_code != 200:
                break
        assert response.status_code == 400 and response.json() == {"ready": False, "reason": "shutting down"}
        assert not triton.is_server_ready() and triton.is_server_live()
        assert not triton.is_model_ready("colors")
    finally:
        triton.close()


# --- the real model ------------------------------------------------------------------------------
@pytest.mark.e2e
def test_real_jpegs_equal_v1(server_factory, real_store: ModelStore, shared_data: Path) -> None:
    files = sorted((shared_data / "val" / "cat").glob("*.jpg"))[:3] + sorted((shared_data / "val" / "dog").glob("*.jpg"))[:3]
    images = [f.read_bytes() for f in files]
    head = "cats_vs_dogs"
    if head not in real_store.heads.names():
        pytest.skip(f"model_store/ has no {head!r} head yet: `tlserve train` it on ../shared data first")
    server = server_factory(real_store, default_head=head)
    classes = head_classes(server, head)
    expected = v1_classify(server, images)
    triton = th.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
    try:
        assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(head)
        assert triton.get_model_metadata(head)["outputs"][1]["shape"] == [-1, len(classes)]
        for binary in (True, False):
            outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities", "features")]
            result = triton.infer(head, [bytes_input(images, binary)], outputs=outputs)
            assert_same_as_v1(expected, result.as_numpy("label"), result.as_numpy("probabilities"), classes)
            np.testing.assert_allclose(result.as_numpy("features"), v1_embed(server, images), rtol=1e-5, atol=1e-5)
    finally:
        triton.close()


# --- fuzzing the inference body (the shared fuzz test mostly hits unknown model names) ---------------
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_infer_bodies_never_5xx(server: ServerProcess, mode: str) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    operation = schemathesis.openapi.from_url(f"{server.url}/openapi.json")["/v2/models/{name}/infer"]["POST"]
    statuses: list[int] = []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case) -> None:
        case.path_parameters = {"name": "colors"}
        response = case.call(timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400:
            assert isinstance(response.json()["error"], str)

    run()
    print(f"\n{mode} infer fuzz: statuses {sorted(Counter(statuses).items())}")
    assert statuses and 404 not in statuses  # the bodies reached the model, not the 404
