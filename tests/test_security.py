"""Security defaults against real servers: API keys, open/closed probes, CORS, head names, and
responses that never carry a traceback or a filesystem path (see SECURITY.md)."""

from __future__ import annotations

import json
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.core.hashing import sha256_bytes
from app.storage.store import ModelStore
from tests.helpers import ADMIN, ADMIN_KEY, REPO, ServerProcess, image_bytes

GOOD = image_bytes((210, 40, 40), "PNG", size=(32, 32))
KEYS = ("k1-secret-0123456789", "k2-secret-abcdefghij")
PROBES = ("/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


def protected() -> list[tuple[str, str, dict]]:
    raw = {"content": GOOD, "headers": {"content-type": "image/png"}}
    return [
        ("POST", "/v1/classify", raw),
        ("POST", "/v1/embed", raw),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models/colors", {}),
        ("POST", "/v1/models/colors/reload", {}),
        ("GET", "/v1/info", {}),
        ("GET", "/v2", {}),
        ("GET", "/v2/models/colors", {}),
        ("GET", "/v2/models/colors/ready", {}),
    ]


def send(server: ServerProcess, method: str, path: str, kwargs: dict, auth: dict[str, str] | None = None) -> httpx.Response:
    headers = {**kwargs.get("headers", {}), **(auth or {})}
    return httpx.request(method, server.url + path, **{**kwargs, "headers": headers}, timeout=30)


class KeyedServer(ServerProcess):
    """A server whose probes may need the key too: readiness is polled with it."""

    def wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()[-2000:]
            try:
                if httpx.get(self.url + path, headers={"x-api-key": KEYS[0]}, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log_text()[-2000:])


@pytest.fixture
def start(tiny_store: ModelStore, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def run(store: ModelStore | None = None, **env: str) -> ServerProcess:
        full = {
            "TLSERVE_MODEL_STORE": str((store or tiny_store).root),
            "TLSERVE_DEFAULT_HEAD": "colors",
            "TLSERVE_INTRA_OP_THREADS": "1",
            "TLSERVE_ADMIN_KEYS": ADMIN_KEY,
        }
        full.update({f"TLSERVE_{k.upper()}": v for k, v in env.items()})
        server = KeyedServer(full, log_path=tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server.start()

    yield run
    for server in started:
        server.stop()


def assert_unauthorized(r: httpx.Response, *, leaked: str = "") -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    if isinstance(body["error"], str):  # the Open Inference Protocol's error shape
        assert "API key" in body["error"]
    else:
        assert set(body["error"]) == {"code", "message", "request_id"} and body["error"]["code"] == "unauthorized"
    if leaked:
        assert leaked not in r.text


# --- API keys ---------------------------------------------------------------------------------
def test_api_keys_guard_every_route_but_the_probes(start: Callable[..., ServerProcess]) -> None:
    # the keys serve as admin keys too, so reload (an admin operation) answers 200 with them; an
    # inference key on an admin route is 403 (tests/test_versions.py)
    server = start(api_keys=",".join(KEYS), admin_keys=",".join(KEYS))
    wrong = [
        {},
        {"authorization": "Bearer nope"},
        {"x-api-key": "nope"},
        {"authorization": f"Bearer {KEYS[0]}x"},  # a longer key
        {"authorization": f"Bearer {KEYS[0][:-1]}"},  # a prefix of the key
        {"authorization": f"Basic {KEYS[0]}"},  # another scheme
        {"authorization": "Bearer"},
        {"x-api-key": ""},
    ]
    for method, path, kwargs in protected():
        for auth in wrong:
            assert_unauthorized(send(server, method, path, kwargs, auth), leaked="nope")
        assert_unauthorized(send(server, method, path + "?api_key=" + KEYS[0], kwargs))  # never from the URL
        for auth in ({"authorization": f"Bearer {KEYS[0]}"}, {"Authorization": f"bearer {KEYS[1]}"}, {"x-api-key": KEYS[1]}):
            r = send(server, method, path, kwargs, auth)
            assert r.status_code == 200, (method, path, auth, r.text)
    for path in PROBES:  # open by default, so load balancers and Prometheus need no secret
        assert httpx.get(server.url + path).status_code == 200, path
    assert "Traceback" not in server.log_text()
    assert KEYS[0] not in server.log_text() and KEYS[1] not in server.log_text()


def test_probes_can_be_closed(start: Callable[..., ServerProcess]) -> None:
    server = start(api_keys=KEYS[0], open_probes="false")
    for path in PROBES:
        assert_unauthorized(httpx.get(server.url + path))
        assert httpx.get(server.url + path, headers={"authorization": f"Bearer {KEYS[0]}"}).status_code == 200, path


ADMIN_ROUTES = [
    ("POST", "/v1/heads/colors/train", {"files": {"red": ("r.png", GOOD)}}),
    ("POST", "/v1/heads/colors/examples", {"files": {"red": ("r.png", GOOD)}}),
    ("POST", "/v1/heads/colors/promote", {"json": {"version": 1}}),
    ("POST", "/v1/heads/colors/rollback", {}),
    ("DELETE", "/v1/heads/colors/versions/1", {}),
    ("DELETE", "/v1/heads/colors", {}),
    ("POST", "/v1/models/colors/reload", {}),
]


def test_without_keys_inference_is_open_and_every_admin_route_is_refused(start: Callable[..., ServerProcess],
                                                                         fresh_tiny_store: ModelStore) -> None:  # fmt: skip
    """No key configured (a server on loopback, as `tlserve serve` starts): nothing that changes state is open.
    A web page the operator visits can send these as simple cross-site requests (no preflight): refused too."""
    server = start(fresh_tiny_store, admin_keys="")
    for method, path, kwargs in protected():
        if not path.endswith("/reload"):
            assert send(server, method, path, kwargs).status_code == 200, path
    before = sorted(p.relative_to(fresh_tiny_store.root) for p in fresh_tiny_store.heads_dir.rglob("*"))
    page = {"origin": "https://evil.example", "content-type": "text/plain"}  # fetch(..., {mode: "no-cors"})
    for method, path, kwargs in ADMIN_ROUTES:
        for auth in ({}, page, {"x-api-key": "guess"}):
            r = send(server, method, path, kwargs, auth)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", (method, path, r.text)
            assert "no admin key is set; set TLSERVE_ADMIN_KEYS" in r.json()["error"]["message"]
    assert sorted(p.relative_to(fresh_tiny_store.root) for p in fresh_tiny_store.heads_dir.rglob("*")) == before


def test_an_admin_key_alone_leaves_inference_open(start: Callable[..., ServerProcess], fresh_tiny_store: ModelStore) -> None:
    """`make run` sets only an admin key: classify needs none, admin routes need that one."""
    server = start(fresh_tiny_store)
    assert send(server, "POST", "/v1/classify", {"content": GOOD, "headers": {"content-type": "image/png"}}).status_code == 200
    r = send(server, "POST", "/v1/heads/colors/rollback", {})
    assert r.status_code == 401 and "admin key" in r.json()["error"]["message"]
    assert send(server, "POST", "/v1/models/colors/reload", {}, ADMIN).status_code == 200


def test_a_loopback_server_answers_only_its_own_host_names(start: Callable[..., ServerProcess]) -> None:
    """DNS rebinding: a page served as evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    server = start()
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        r = httpx.get(server.url + "/v1/models", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
        assert "TLSERVE_ALLOWED_HOSTS" in r.json()["error"]["message"]
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200, host
    named = start(allowed_hosts="127.0.0.1,tlserve.internal,*.example.org")  # the names given replace the default
    assert httpx.get(named.url + "/v1/models", headers={"host": "a.example.org"}).status_code == 200
    assert httpx.get(named.url + "/v1/models", headers={"host": "tlserve.internal:8000"}).status_code == 200
    assert httpx.get(named.url + "/v1/models", headers={"host": "localhost"}).status_code == 400
    assert httpx.get(named.url + "/v1/models", headers={"host": "example.org"}).status_code == 400


# --- CORS ---------------------------------------------------------------------------------------
def preflight(server: ServerProcess, origin: str) -> httpx.Response:
    headers = {"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    return httpx.options(server.url + "/v1/classify", headers=headers)


def test_cors_is_off_unless_configured(start: Callable[..., ServerProcess]) -> None:
    server = start()
    r = preflight(server, "https://evil.example")
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.post(
        server.url + "/v1/classify", content=GOOD, headers={"content-type": "image/png", "origin": "https://evil.example"}
    )
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)


def test_cors_allows_only_the_configured_origins(start: Callable[..., ServerProcess]) -> None:
    server = start(cors_origins="https://app.example")
    ok = preflight(server, "https://app.example")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in ok.headers["access-control-allow-methods"]
    bad = preflight(server, "https://evil.example")
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    r = httpx.post(
        server.url + "/v1/classify", content=GOOD, headers={"content-type": "image/png", "origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in r.headers


# --- head names and pickles outside the heads folder ----------------------------------------
class Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[Path]]:
        return Path.touch, (self.marker,)


def test_a_head_outside_the_heads_folder_is_unreachable(
    fresh_tiny_store: ModelStore, start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A complete, checksum-consistent malicious head one level up: no name reaches it."""
    store = fresh_tiny_store
    marker = tmp_path / "unpickled"
    blob = pickle.dumps(Touch(marker), protocol=5)
    card = json.loads((store.heads.current_folder("colors") / "card.json").read_text())
    evil = store.root / "evil"
    evil.mkdir()
    (evil / "head-evil.pkl").write_bytes(blob)
    (evil / "card.json").write_text(
        json.dumps({**card, "name": "evil", "pickle": "head-evil.pkl", "pickle_sha256": sha256_bytes(blob)})
    )
    shutil.copytree(evil, tmp_path / "outside")
    server = start(store)
    names = [
        "../evil",
        "..",
        "evil/..",
        "./../evil",
        "..\\evil",
        "%2e%2e/evil",
        str(tmp_path / "outside"),
        "evil\x00",
        "évil",
        "e" * 65,
    ]
    for name in names:
        for r in (
            httpx.post(server.url + "/v1/classify", params={"head": name}, content=GOOD, headers={"content-type": "image/png"}),
            httpx.post(server.url + "/v1/classify", json={"images": [{"b64": "AA=="}], "head": name}),
            httpx.post(server.url + "/v1/classify", data={"head": name}, files={"f": ("a.png", GOOD)}),
        ):
            assert r.status_code in (404, 422), (name, r.text)
            assert r.json()["error"]["code"] in ("head_not_found", "malformed_request")
    for path in ("/v1/models/evil", "/v1/models/..%2Fevil", "/v1/models/%2E%2E/evil", "/v1/models/evil/reload"):
        r = httpx.request("POST" if path.endswith("reload") else "GET", server.url + path, headers=ADMIN)
        assert r.status_code == 404, (path, r.text)
    assert not marker.exists(), "a pickle outside the heads folder was unpickled"
    assert "evil" not in [m["name"] for m in httpx.get(server.url + "/v1/models").json()["models"]]


# --- no tracebacks, no filesystem paths ---------------------------------------------------------
def test_no_traceback_or_path_in_any_response(fresh_tiny_store: ModelStore, start: Callable[..., ServerProcess]) -> None:
    store = fresh_tiny_store
    broken = store.heads_dir / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{ not json")
    colors = json.loads((store.heads.current_folder("colors") / "card.json").read_text())
    assert colors["training"]["data_dir"].startswith("/")  # the card on disk does hold a server path
    server = start(store)
    requests = [
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models/colors", {}),
        ("GET", "/v1/models/broken", {}),
        ("POST", "/v1/models/broken/reload", {}),
        ("GET", "/v1/models/missing", {}),
        ("GET", "/v1/info", {}),
        ("GET", "/v2", {}),
        ("GET", "/v2/models/colors", {}),
        ("GET", "/v2/models/broken", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/metrics", {}),
        ("GET", "/readyz", {}),
        ("GET", "/nowhere", {}),
        ("DELETE", "/v1/models/colors", {}),
        ("POST", "/v1/classify", {"content": b"not an image", "headers": {"content-type": "image/jpeg"}}),
        ("POST", "/v1/classify", {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/classify", {"content": GOOD, "headers": {"content-type": "image/png"}, "params": {"head": "broken"}}),
        ("POST", "/v2/models/colors/infer", {"json": {"inputs": "nonsense"}}),
    ]
    secrets = ("Traceback", 'File "', str(store.root), str(store.root.resolve()), str(REPO), "/tmp/", "site-packages")
    for method, path, kwargs in requests:
        r = httpx.request(method, server.url + path, **{**kwargs, "headers": {**kwargs.get("headers", {}), **ADMIN}}, timeout=30)
        assert r.status_code < 500 or "broken" in f"{path} {kwargs}", (path, r.status_code, r.text)  # a corrupt card: 500
        for secret in secrets:
            assert secret not in r.text, (method, path, secret, r.text[:500])
        assert "server" not in r.headers and "x-powered-by" not in r.headers
    listed = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert "<model_store>/heads/broken/card.json" in listed["broken"]["error"]  # named, but not located
    card = httpx.get(server.url + "/v1/models/colors").json()["card"]
    assert card["training"]["data_dir"] == Path(colors["training"]["data_dir"]).name
