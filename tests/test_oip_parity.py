"""The Open Inference Protocol's two fronts give one answer: the same requests to one real server over
REST ``/v2`` and over gRPC, compared field by field (model, version, id, each output's name, datatype,
shape and values; or the error's status and message) for every option: default and explicit outputs,
the familiarity outputs, ``ood_policy`` report and refuse, pinned versions (current, not current, one
that fails verification, missing), readiness, metadata and bad inputs.

REST sends its images with the binary tensor data extension, the framing gRPC's ``raw_input_contents``
uses, so both fronts read the same bytes; gRPC calls go through Triton's own generated stubs."""

from __future__ import annotations

import ast
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.storage.registry import CARD
from app.storage.store import ModelStore
from tests.helpers import REPO, ServerProcess, free_port, image_bytes
from tests.test_familiarity import _between
from tests.test_versions import add_version

grpc = pytest.importorskip("grpc")
pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402

RED, BLUE = image_bytes((210, 40, 40), seed=300), image_bytes((40, 40, 210), "JPEG", seed=301)
BETWEEN = _between()  # like neither class's photos: not in distribution for the colors head
IMAGES = [RED, BLUE, BETWEEN]
HEADER = "Inference-Header-Content-Length"
GRPC_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT",
             415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip


@pytest.fixture(scope="module")
def store(tiny_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """colors v1 (current, familiarity data), v2 (not current, flipped, no familiarity data) and v3 (not
    current, one artifact changed after it was signed: fails verification)."""
    root = tmp_path_factory.mktemp("parity") / "store"
    shutil.copytree(tiny_store.root, root)
    copy = ModelStore(root)
    assert add_version(copy, flip=True) == 2
    assert add_version(copy) == 3
    folder = copy.heads.version_folder("colors", 3)
    victim = next(p for p in sorted(folder.iterdir()) if p.name != CARD and p.is_file())
    victim.write_bytes(victim.read_bytes() + b"\0")
    return copy


@pytest.fixture(scope="module")
def server(store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(store, default_head="colors", max_images_per_request=4, grpc_port=free_port())


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.env['TLSERVE_GRPC_PORT']}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def frame(images: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in images)


# --- one request, two wire forms -----------------------------------------------------------------
def request(
    images: list[bytes] = IMAGES,
    *,
    model: str = "colors",
    version: str = "",
    shape: list[int] | None = None,
    name: str = "image",
    datatype: str = "BYTES",
    outputs: list[tuple[str, dict[str, Any]]] | None = None,
    parameters: dict[str, Any] | None = None,
    id: str = "",
) -> dict[str, Any]:
    return {"images": images, "model": model, "version": version, "shape": shape or [len(images)], "name": name,
            "datatype": datatype, "outputs": outputs, "parameters": parameters or {}, "id": id}  # fmt: skip


def over_rest(server: ServerProcess, r: dict[str, Any]) -> dict[str, Any]:
    blob = frame(r["images"])
    doc: dict[str, Any] = {
        "inputs": [
            {"name": r["name"], "datatype": r["datatype"], "shape": r["shape"], "parameters": {"binary_data_size": len(blob)}}
        ]
    }
    if r["outputs"] is not None:
        doc["outputs"] = [{"name": n, "parameters": p} if p else {"name": n} for n, p in r["outputs"]]
    if r["parameters"]:
        doc["parameters"] = r["parameters"]
    if r["id"]:
        doc["id"] = r["id"]
    header = json.dumps(doc).encode()
    path = f"/v2/models/{r['model']}" + (f"/versions/{r['version']}" if r["version"] else "") + "/infer"
    response = httpx.post(server.url + path, content=header + blob, headers={HEADER: str(len(header))}, timeout=60)
    body = response.json()
    if response.status_code != 200:
        return {"error": (GRPC_CODE[response.status_code], body["error"])}
    out = [(o["name"], o["datatype"], o["shape"], values(o["datatype"], o["data"])) for o in body["outputs"]]
    return {"model_name": body["model_name"], "model_version": body["model_version"], "id": body.get("id", ""), "outputs": out}


def _param(message: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        message[key].bool_param = value
    elif isinstance(value, int):
        message[key].int64_param = value
    else:
        message[key].string_param = value


def over_grpc(stub: pb_grpc.GRPCInferenceServiceStub, r: dict[str, Any]) -> dict[str, Any]:
    message = pb.ModelInferRequest(model_name=r["model"], model_version=r["version"], id=r["id"])
    message.inputs.add(name=r["name"], datatype=r["datatype"], shape=r["shape"])
    message.raw_input_contents.append(frame(r["images"]))
    for name, params in r["outputs"] or ():
        out = message.outputs.add(name=name)
        for key, value in params.items():
            _param(out.parameters, key, value)
    for key, value in r["parameters"].items():
        _param(message.parameters, key, value)
    try:
        response = stub.ModelInfer(message, timeout=60)
    except grpc.RpcError as err:
        return {"error": (err.code().name, err.details())}
    outputs = [
        (o.name, o.datatype, list(o.shape), unpack(o.datatype, raw))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    ]
    return {"model_name": response.model_name, "model_version": response.model_version, "id": response.id, "outputs": outputs}


def values(datatype: str, data: list[Any]) -> list[Any]:
    """JSON output data as the values the binary form holds (FP32 as float32)."""
    if datatype == "FP32":
        return np.asarray(data, np.float32).tolist()
    return list(data)


def unpack(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "FP32":
        return np.frombuffer(raw, "<f4").tolist()
    if datatype == "BOOL":
        return [bool(b) for b in raw]
    assert datatype == "BYTES", datatype
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n].decode())
        i += 4 + n
    return out


def both(server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub, **kw: Any) -> dict[str, Any]:
    """The answer of one request over REST; asserts that gRPC's is the same, field by field."""
    r = request(**kw)
    rest, rpc = over_rest(server, r), over_grpc(stub, r)
    assert rest.keys() == rpc.keys(), (rest, rpc)
    if "error" in rest:
        assert rest["error"] == rpc["error"]
        return rest
    for key in ("model_name", "model_version", "id"):
        assert rest[key] == rpc[key], key
    assert [o[:3] for o in rest["outputs"]] == [o[:3] for o in rpc["outputs"]]
    for a, b in zip(rest["outputs"], rpc["outputs"], strict=True):
        assert a[3] == b[3], a[0]  # the same batcher and model: the same floats, to the bit
    return rest


def names(answer: dict[str, Any]) -> list[str]:
    return [o[0] for o in answer["outputs"]]


def output(answer: dict[str, Any], name: str) -> list[Any]:
    return next(o[3] for o in answer["outputs"] if o[0] == name)


# --- inference -----------------------------------------------------------------------------------
FAMILIAR = ["label", "probabilities", "familiarity", "in_distribution"]


def test_default_outputs_include_familiarity_for_a_head_that_has_it(server: ServerProcess, stub: Any) -> None:
    answer = both(server, stub, id="req-1")
    assert names(answer) == FAMILIAR and answer["id"] == "req-1" and answer["model_version"] == "1"
    assert output(answer, "in_distribution") == [True, True, False]
    assert output(answer, "label")[:2] == ["red", "blue"] and output(answer, "label")[2] in ("red", "blue")


def test_explicit_outputs(server: ServerProcess, stub: Any) -> None:
    answer = both(server, stub, outputs=[("features", {}), ("label", {})])
    assert names(answer) == ["features", "label"]
    answer = both(server, stub, outputs=[("familiarity", {}), ("in_distribution", {})])
    assert names(answer) == ["familiarity", "in_distribution"]
    answer = both(server, stub, outputs=[("probabilities", {"classification": 1}), ("label", {"binary_data": False})])
    assert [o[1:3] for o in answer["outputs"]] == [("BYTES", [3, 1]), ("BYTES", [3])]


@pytest.mark.parametrize("policy", ["report", "refuse", None])
def test_ood_policy(server: ServerProcess, stub: Any, policy: str | None) -> None:
    answer = both(server, stub, parameters={"ood_policy": policy} if policy else {})
    labels = output(answer, "label")
    assert labels[:2] == ["red", "blue"]
    assert (labels[2] == "") == (policy == "refuse")  # the setting's default is report


def test_pinned_versions(server: ServerProcess, stub: Any) -> None:
    current = both(server, stub, version="1")
    assert current["model_version"] == "1" and names(current) == FAMILIAR
    other = both(server, stub, version="2", parameters={"ood_policy": "refuse"})
    assert other["model_version"] == "2" and names(other) == ["label", "probabilities"]  # v2 has no familiarity data
    assert output(other, "label")[:2] == ["blue", "red"]  # flipped weights; never refused without familiarity data
    asked = both(server, stub, version="2", outputs=[("in_distribution", {})])
    assert asked["error"][0] == "INVALID_ARGUMENT" and "no familiarity data" in asked["error"][1]
    tampered = both(server, stub, version="3")
    assert tampered["error"][0] == "INTERNAL" and "does not match its card" in tampered["error"][1]  # ArtifactError
    missing = both(server, stub, version="9")
    assert missing["error"][0] == "NOT_FOUND" and "versions: 1, 2, 3" in missing["error"][1]


BAD = {
    "unknown model": {"model": "no_such_head"},
    "wrong datatype": {"datatype": "FP32"},
    "wrong input name": {"name": "pixels"},
    "shape [3, 2]": {"shape": [3, 2]},
    "shape [3, 1]": {"shape": [3, 1]},  # allowed
    "shape says 4": {"shape": [4]},
    "no images": {"images": [], "shape": [0]},
    "over max_images_per_request": {"images": IMAGES * 2},
    "not an image": {"images": [RED, b"this is not an image"]},
    "unknown output": {"outputs": [("logits", {})]},
    "output twice": {"outputs": [("label", {}), ("label", {})]},
    "classification on label": {"outputs": [("label", {"classification": 1})]},
    "classification 0": {"outputs": [("probabilities", {"classification": 0})]},
    "binary_data not a bool": {"outputs": [("label", {"binary_data": "yes"})]},
    "ood_policy unknown": {"parameters": {"ood_policy": "ignore"}},
    "ood_policy not a string": {"parameters": {"ood_policy": 3}},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests(server: ServerProcess, stub: Any, case: str) -> None:
    answer = both(server, stub, **BAD[case])
    assert ("error" in answer) == (case != "shape [3, 1]"), answer


# --- readiness and metadata ----------------------------------------------------------------------
def rest_ready(server: ServerProcess, model: str, version: str) -> tuple[str, bool | None]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
    r = httpx.get(server.url + path, timeout=30)
    if r.status_code in (200, 400) and "ready" in r.json():
        return "OK", r.json()["ready"]
    return GRPC_CODE[r.status_code], None


def grpc_ready(stub: Any, model: str, version: str) -> tuple[str, bool | None]:
    try:
        return "OK", stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=30).ready
    except grpc.RpcError as err:
        return err.code().name, None


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [("colors", "", True), ("colors", "1", True), ("colors", "2", True), ("colors", "3", False),
     ("colors", "9", None), ("no_such_head", "", None)],
)  # fmt: skip
def test_model_ready(server: ServerProcess, stub: Any, model: str, version: str, expected: bool | None) -> None:
    rest = rest_ready(server, model, version)
    assert rest == grpc_ready(stub, model, version)
    assert rest[1] is expected and (rest[0] == "NOT_FOUND") == (expected is None)


def test_server_metadata_and_readiness(server: ServerProcess, stub: Any) -> None:
    rest = httpx.get(f"{server.url}/v2", timeout=30).json()
    rpc = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
    assert (rest["name"], rest["version"], rest["extensions"]) == (rpc.name, rpc.version, list(rpc.extensions))
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).json()["ready"] is True
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready is True
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live is True


@pytest.mark.parametrize("version", ["", "1", "2", "9"])
def test_model_metadata(server: ServerProcess, stub: Any, version: str) -> None:
    r = httpx.get(f"{server.url}/v2/models/colors" + (f"/versions/{version}" if version else ""), timeout=30)
    try:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="colors", version=version), timeout=30)
    except grpc.RpcError as err:
        assert (GRPC_CODE[r.status_code], r.json()["error"]) == (err.code().name, err.details())
        assert version == "9"
        return
    rest = r.json()
    tensors = [[(t.name, t.datatype, list(t.shape)) for t in ts] for ts in (meta.inputs, meta.outputs)]
    assert tensors == [[(t["name"], t["datatype"], t["shape"]) for t in rest[k]] for k in ("inputs", "outputs")]
    assert (rest["name"], rest["platform"], rest["versions"]) == (meta.name, meta.platform, list(meta.versions))
    assert rest["versions"] == ["1", "2", "3"]
    familiar = {"familiarity", "in_distribution"} <= {t["name"] for t in rest["outputs"]}
    assert familiar == (version != "2")


def test_store_is_as_described(store: ModelStore) -> None:
    """The fixture's versions are what the tests above take them to be."""
    cards = {v: json.loads((store.heads.version_folder("colors", v) / CARD).read_text()) for v in (1, 2, 3)}
    assert "familiarity" in cards[1] and "familiarity" not in cards[2]
    assert store.heads.get("colors").version == 1


# --- the layering the two fronts rely on ---------------------------------------------------------
def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", ["app/grpc", "app/serving/oip"])
def test_grpc_and_the_protocol_layer_import_nothing_of_the_http_front(package: str) -> None:
    files = sorted((REPO / package).glob("*.py"))
    assert files
    for path in files:  # every import, at module level or inside a function
        bad = {m for m in _imports(path) if m == "app.api" or m.startswith("app.api.")}
        assert not bad, f"{path.name} imports {bad}"
    code = (
        "import sys, app.grpc.server, app.serving.oip.plane; "
        "print(sorted(m for m in sys.modules if m == 'app.api' or m.startswith('app.api.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"  # nor through anything they import
