"""/v1 over real HTTP: a real uvicorn process on loopback with the tiny real model store."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.storage.store import ModelStore
from tests.helpers import ADMIN, ServerProcess, image_bytes

RED, BLUE = (210, 40, 40), (40, 40, 210)


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", max_images_per_request=8, max_body_bytes=200000)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    assert "Traceback" not in resp.text
    return body["error"]


def test_three_input_forms_agree(client: httpx.Client) -> None:
    red, blue = image_bytes(RED, seed=1), image_bytes(BLUE, fmt="JPEG", seed=2)
    multipart = client.post("/v1/classify", files=[("file", ("r.png", red)), ("file", ("b.jpg", blue))]).json()
    raw = [client.post("/v1/classify", content=d, headers={"content-type": "image/png"}).json() for d in (red, blue)]
    body = {"images": [{"b64": base64.b64encode(d).decode(), "name": n} for d, n in ((red, "r"), (blue, "b"))]}
    js = client.post("/v1/classify", json=body).json()
    assert [r["label"] for r in multipart["results"]] == ["red", "blue"]
    assert [r["file"] for r in multipart["results"]] == ["r.png", "b.jpg"]
    for i in range(2):
        assert (
            multipart["results"][i]["probabilities"] == raw[i]["results"][0]["probabilities"] == js["results"][i]["probabilities"]
        )
    assert multipart["head"] == "colors" and len(multipart["model"]) == 12 and multipart["request_id"]


def test_top_k_and_options_in_the_body(client: httpx.Client) -> None:
    red = image_bytes(RED)
    r = client.post("/v1/classify", params={"top_k": 1}, content=red, headers={"content-type": "image/png"}).json()
    assert r["results"][0]["top_k"] == [{"label": "red", "probability": r["results"][0]["confidence"]}]
    r = client.post(
        "/v1/classify", json={"images": [{"b64": base64.b64encode(red).decode()}], "top_k": 2, "head": "colors"}
    ).json()
    assert [t["label"] for t in r["results"][0]["top_k"]] == ["red", "blue"]
    r = client.post("/v1/classify", files=[("f", ("x.png", red))], data={"top_k": "1"}).json()
    assert len(r["results"][0]["top_k"]) == 1


def test_one_bad_image_does_not_fail_the_others(client: httpx.Client) -> None:
    files = [
        ("f", ("good.png", image_bytes(RED))),
        ("f", ("bad.jpg", b"<html>nope</html>")),
        ("f", ("good2.png", image_bytes(BLUE))),
    ]
    r = client.post("/v1/classify", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[0]["label"] == "red" and res[2]["label"] == "blue"
    assert res[1]["error"]["code"] == "unsupported_format" and res[1]["error"]["status"] == 415 and "label" not in res[1]


def test_single_bad_image_gets_its_status(client: httpx.Client) -> None:
    assert_error(
        client.post("/v1/classify", content=b"%PDF-1.4 nope", headers={"content-type": "image/jpeg"}), 415, "unsupported_format"
    )
    assert_error(client.post("/v1/classify", content=b"", headers={"content-type": "image/png"}), 422, "empty_input")


def test_limits_and_errors_use_one_error_model(client: httpx.Client) -> None:
    png = image_bytes(RED)
    e = assert_error(client.post("/v1/classify", files=[("f", (f"{i}.png", png)) for i in range(9)]), 413, "too_many_images")
    assert "8" in e["message"]
    e = assert_error(
        client.post("/v1/classify", content=b"x" * 200_001, headers={"content-type": "image/png"}), 413, "body_too_large"
    )
    assert "max_body_bytes" in e["message"]
    assert_error(
        client.post("/v1/classify", params={"head": "nope"}, content=png, headers={"content-type": "image/png"}),
        404,
        "head_not_found",
    )
    assert_error(
        client.post("/v1/classify", content=b"{", headers={"content-type": "application/json"}), 422, "malformed_request"
    )
    assert_error(client.post("/v1/classify", json=[1, 2]), 422, "malformed_request")
    assert_error(
        client.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert_error(
        client.post("/v1/classify", params={"top_k": 0}, content=png, headers={"content-type": "image/png"}),
        422,
        "malformed_request",
    )
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")
    bad = client.post("/v1/classify", json={"images": [{"b64": "!!!"}]})
    assert_error(bad, 422, "malformed_request")


def test_request_id_is_echoed(client: httpx.Client) -> None:
    r = client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/v1/models", headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_embed(client: httpx.Client, tiny_store: ModelStore) -> None:
    dim = tiny_store.extractor().feature_dim
    r = client.post(
        "/v1/embed", files=[("f", ("a.png", image_bytes(RED))), ("f", ("b.txt", b"text"))], params={"normalize": True}
    )
    body = r.json()
    assert body["dim"] == dim and body["normalized"] is True
    vec = body["results"][0]["embedding"]
    assert len(vec) == dim and abs(sum(v * v for v in vec) - 1) < 1e-4
    assert body["results"][1]["error"]["code"] == "unsupported_format"


def test_models_info_probes_metrics(client: httpx.Client, tiny_store: ModelStore) -> None:
    models = client.get("/v1/models").json()
    assert models["default"] == "colors"
    (m,) = [x for x in models["models"] if x["name"] == "colors"]
    assert m["loaded"] and m["classes"] == ["blue", "red"] and m["extractor_sha256"] == tiny_store.extractor().sha256
    card = client.get("/v1/models/colors").json()
    assert card["card"]["pickle_sha256"] == m["pickle_sha256"]
    assert_error(client.get("/v1/models/h%C3%A9ad"), 404, "head_not_found")
    assert client.get("/v1/models/..%2F..%2Fmanifest.json").status_code == 404
    info = client.get("/v1/info").json()
    assert info["providers"] == ["CPUExecutionProvider"] and info["gpu"] is False
    assert info["extractor"]["input_size"] == 32 and info["threads"]["intra_op"] == 1
    assert set(info["batching"]) == {"max_batch_size", "max_queue_delay_ms", "max_queue_size"}
    assert client.get("/livez").json()["status"] == "alive"
    assert client.get("/readyz").json()["status"] == "ready"
    metrics = client.get("/metrics").text
    for name in ("tlserve_request_duration_seconds_bucket", "tlserve_queue_wait_seconds", "tlserve_inference_seconds",
                 "tlserve_batch_size_images", "tlserve_queue_depth_images", "tlserve_in_flight_requests",
                 "tlserve_training_images_total", "tlserve_training_engine_share", "tlserve_images_total", "tlserve_rejections_total", "tlserve_model_info"):  # fmt: skip
        assert name in metrics


def test_openapi_has_stable_operation_ids(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    ops = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"classify", "embed", "list_models", "get_model", "reload_model", "info", "livez", "readyz", "metrics"} <= ops
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]


def test_json_access_log_carries_request_fields(client: httpx.Client, server: ServerProcess) -> None:
    rid = "log-check-1"
    client.post("/v1/classify", content=image_bytes(RED), headers={"content-type": "image/png", "x-request-id": rid})
    entries: list[dict] = []
    deadline = time.monotonic() + 10  # the access log line is written once the response has gone out
    while not entries and time.monotonic() < deadline:
        entries = [x for x in map(json.loads, filter(lambda x: x.startswith("{"), server.log_text().splitlines()))
                   if x.get("request_id") == rid]  # fmt: skip
        time.sleep(0.05)
    (entry,) = entries
    assert entry["status"] == 200 and entry["images"] == 1 and entry["head"] == "colors" and entry["duration_ms"] > 0


def test_reload_picks_up_a_retrained_head(server_factory, fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    from app.core.settings import Settings
    from app.learning.training import Trainer
    from tests.helpers import write_color_dataset

    srv = server_factory(fresh_tiny_store, default_head="colors")
    before = httpx.get(f"{srv.url}/v1/models/colors").json()["card"]["pickle_sha256"]
    data = write_color_dataset(tmp_path / "d", per_class=5)
    settings = Settings(model_store=fresh_tiny_store.root, intra_op_threads=1, feature_cache_dir=tmp_path / "c")
    Trainer(settings, progress=False).train(data, "colors", c=0.5)
    r = httpx.post(f"{srv.url}/v1/models/colors/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["pickle_sha256"] != before and r.json()["loaded"]
    # a brand-new head is loaded by the same call
    Trainer(settings, progress=False).train(data, "newhead", c=1.0)
    assert httpx.post(f"{srv.url}/v1/models/newhead/reload", headers=ADMIN).status_code == 200
    r = httpx.post(
        f"{srv.url}/v1/classify", params={"head": "newhead"}, content=image_bytes(BLUE), headers={"content-type": "image/png"}
    )
    assert r.json()["head"] == "newhead" and r.json()["results"][0]["label"] == "blue"


def test_head_written_by_train_is_picked_up_by_polling(server_factory, fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    import time

    from app.core.settings import Settings
    from app.learning.training import Trainer
    from tests.helpers import write_color_dataset

    srv = server_factory(fresh_tiny_store, default_head="colors", head_poll_interval_s="0.2")
    data = write_color_dataset(tmp_path / "d", per_class=5)
    Trainer(Settings(model_store=fresh_tiny_store.root, intra_op_threads=1), progress=False).train(data, "polled", c=1.0)
    for _ in range(100):
        if any(m["name"] == "polled" and m["loaded"] for m in httpx.get(f"{srv.url}/v1/models").json()["models"]):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the new head was not loaded by polling")


def test_an_incompatible_default_head_leaves_the_others_served_and_names_itself(server_factory, fresh_tiny_store: ModelStore,
                                                                                tmp_path: Path) -> None:  # fmt: skip
    """Re-exported with other pooling, the default head no longer loads: the server is ready with the heads that do,
    and a request for the default head gets its named error (with the command that fixes it), never a silent 503."""
    from app.core.settings import Settings
    from app.learning.export import export
    from app.learning.training import Trainer
    from tests.helpers import tiny_weights, write_color_dataset

    store = fresh_tiny_store
    export(store, tiny_weights(), {"name": "test", "artifact": "tiny"}, size=store.extractor().size, pooling="max")  # type: ignore[arg-type]
    data = write_color_dataset(tmp_path / "d", per_class=5)
    Trainer(Settings(model_store=store.root, intra_op_threads=1), progress=False).train(data, "fresh", c=1.0)
    srv = server_factory(store, default_head="colors")
    ready = httpx.get(f"{srv.url}/readyz")
    assert ready.status_code == 200, ready.text
    r = httpx.post(f"{srv.url}/v1/classify", content=image_bytes(BLUE), headers={"content-type": "image/png"})
    error = r.json()["error"]
    assert r.status_code >= 400 and "colors" in error["message"] and "retrain it with `tlserve train`" in error["message"], error
    r = httpx.post(
        f"{srv.url}/v1/classify", params={"head": "fresh"}, content=image_bytes(BLUE), headers={"content-type": "image/png"}
    )
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "blue"
    assert "default head 'colors' is not usable" in srv.log_text()
