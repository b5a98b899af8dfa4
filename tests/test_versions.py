"""Head versions over HTTP and the CLI: list, promote (compare-and-swap), roll back, delete, pin a
version per request (/v1 and the OIP), admin keys; two replicas sharing one store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th

from app.storage.registry import load_head, save_head
from app.storage.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, image_bytes

RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)
PNG = {"content-type": "image/png"}


def add_version(store: ModelStore, flip: bool = False) -> int:
    """A new version of `colors`; with ``flip`` its weights are negated, so red photos answer blue."""
    head = load_head(store.heads, "colors")
    if flip:
        head.estimator.coef_ = -head.estimator.coef_
        head.estimator.intercept_ = -head.estimator.intercept_
    card = {k: v for k, v in head.card.items() if k not in ("name", "signature", "familiarity")}
    return save_head(store.heads, "colors", head.estimator, card, promote=False).version


def label(server: ServerProcess, **params: object) -> tuple[int, str | None, int | None]:
    r = httpx.post(f"{server.url}/v1/classify", params=params, content=RED, headers=PNG)
    body = r.json()
    return r.status_code, (body.get("results") or [{}])[0].get("label"), body.get("version")


def test_versions_list_promote_rollback_delete_and_pin(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    store = fresh_tiny_store
    v2 = add_version(store, flip=True)
    server = server_factory(store, default_head="colors")
    url = f"{server.url}/v1/heads/colors"

    listed = httpx.get(f"{url}/versions").json()
    assert listed["current"] == 1 and listed["served"] == 1 and [v["version"] for v in listed["versions"]] == [1, 2]
    assert listed["versions"][0]["current"] is True and listed["versions"][0]["accuracy"] is not None

    assert label(server) == (200, "red", 1)
    assert label(server, version=2) == (200, "blue", 2)  # pinned, not promoted
    r = httpx.post(f"{server.url}/v1/classify", params={"version": 9}, content=RED, headers=PNG)
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    assert "versions: 1, 2" in r.json()["error"]["message"]

    r = httpx.post(f"{url}/promote", json={"version": v2, "expected": 2}, headers=ADMIN)  # stale expectation: nothing changes
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_conflict"
    r = httpx.post(f"{url}/promote", json={"version": v2, "expected": 1}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["current"] == 2 and r.json()["served"] == 2
    assert label(server) == (200, "blue", 2)  # this replica serves it at once

    r = httpx.delete(f"{url}/versions/2", headers=ADMIN)
    assert r.status_code == 409 and "is current" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["served"] == 1
    assert label(server) == (200, "red", 1)
    assert httpx.delete(f"{url}/versions/2", headers=ADMIN).status_code == 200
    assert [v["version"] for v in httpx.get(f"{url}/versions").json()["versions"]] == [1]
    r = httpx.delete(f"{server.url}/v1/heads/colors", headers=ADMIN)
    assert r.status_code == 409 and "default head" in r.json()["error"]["message"]


def test_oip_model_version_routes(fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]) -> None:
    store = fresh_tiny_store
    add_version(store, flip=True)
    server = server_factory(store, default_head="colors")
    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.get_model_metadata("colors")["versions"] == ["1", "2"]
        assert client.is_model_ready("colors", "2")
        for version, expected in (("", "red"), ("1", "red"), ("2", "blue")):
            inp = th.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([RED], dtype=object), binary_data=True)
            result = client.infer("colors", [inp], model_version=version, outputs=[th.InferRequestedOutput("label")])
            assert result.as_numpy("label")[0].decode() == expected, version
            assert result.get_response()["model_version"] == (version or "1")
        r = httpx.post(f"{server.url}/v2/models/colors/versions/7/infer", json={"inputs": []})
        assert r.status_code == 404 and "versions: 1, 2" in r.json()["error"]
    finally:
        client.close()


def test_admin_operations_need_an_admin_key(fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]) -> None:
    add_version(fresh_tiny_store)
    server = server_factory(fresh_tiny_store, default_head="colors", api_keys="infer-key", admin_keys="admin-key")
    user, admin = {"X-API-Key": "infer-key"}, {"Authorization": "Bearer admin-key"}
    url = f"{server.url}/v1/heads/colors"
    assert httpx.get(f"{url}/versions", headers=user).status_code == 200  # reading needs an inference key
    assert httpx.get(f"{url}/versions").status_code == 401
    for method, path, body in (("POST", "/promote", {"version": 2}), ("POST", "/rollback", None),
                               ("DELETE", "/versions/2", None)):  # fmt: skip
        r = httpx.request(method, url + path, json=body, headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)
    r = httpx.post(f"{server.url}/v1/models/colors/reload", headers=user)
    assert r.status_code == 403  # reload is an admin operation too
    assert httpx.post(f"{server.url}/v1/models/colors/reload", headers=admin).status_code == 200
    assert httpx.post(f"{url}/promote", json={"version": 2}, headers=admin).json()["served"] == 2
    assert httpx.post(f"{server.url}/v1/classify", content=RED, headers={**PNG, **admin}).json()["version"] == 2


def test_api_keys_without_admin_keys_refuse_admin_operations(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(fresh_tiny_store, default_head="colors", api_keys="infer-key")
    r = httpx.post(f"{server.url}/v1/models/colors/reload", headers={"X-API-Key": "infer-key"})
    assert r.status_code == 403 and "TLSERVE_ADMIN_KEYS" in r.json()["error"]["message"]


def test_a_promotion_reaches_every_replica_sharing_the_store(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    store = fresh_tiny_store
    v2 = add_version(store, flip=True)
    a = server_factory(store, default_head="colors", head_poll_interval_s="0.2")
    b = server_factory(store, default_head="colors", head_poll_interval_s="0.2")
    assert httpx.post(f"{a.url}/v1/heads/colors/promote", json={"version": v2}, headers=ADMIN).status_code == 200
    deadline = time.monotonic() + 15
    while label(b)[2] != v2:
        assert time.monotonic() < deadline, "replica b never served the promoted version"
        time.sleep(0.1)
    assert label(b) == (200, "blue", v2) and label(a) == (200, "blue", v2)


def test_cli_lists_promotes_rolls_back_and_deletes(fresh_tiny_store: ModelStore) -> None:
    store = fresh_tiny_store
    add_version(store)
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(store.root)}

    def tlserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "heads", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    out = tlserve("list", "colors")
    assert out.returncode == 0 and "* colors v1" in out.stdout and "  colors v2" in out.stdout
    assert "* colors v2" in tlserve("promote", "colors", "2", "--expect", "1").stdout
    bad = tlserve("promote", "colors", "1", "--expect", "1")
    assert bad.returncode == 1 and "current version is 2, not 1" in bad.stderr
    assert "* colors v1" in tlserve("rollback", "colors").stdout
    refused = tlserve("delete", "colors", "2")  # no terminal to ask on: --yes is needed
    assert refused.returncode == 2 and "pass --yes" in refused.stderr and store.heads.versions("colors") == [1, 2]
    assert tlserve("delete", "colors", "2", "--yes").returncode == 0 and store.heads.versions("colors") == [1]
    assert tlserve("promote", "colors").returncode == 2  # a usage error, before any work
    missing = tlserve("delete", "nope")
    assert missing.returncode == 1 and "no head named 'nope'" in missing.stderr


@pytest.mark.parametrize("path", ["/v1/heads/..%2Fetc/versions", "/v1/heads/a%00b/versions"])
def test_hostile_head_names_touch_no_file(path: str, tiny_store: ModelStore, server_factory) -> None:
    server = server_factory(tiny_store, default_head="colors")
    r = httpx.get(server.url + path)
    assert r.status_code == 404 and "Traceback" not in r.text


def test_a_pinned_version_is_verified_once_not_at_every_request(fresh_tiny_store: ModelStore) -> None:
    """A non-current version pinned by requests is loaded (read, hashed, checked) once and kept while its
    card is the same file; a card replaced on disk is verified again; pinned_versions_cached=0 keeps none."""
    from app.storage.files import atomic_write
    from app.storage.registry import CARD, HeadRegistry

    store = fresh_tiny_store
    add_version(store, flip=True)
    space = store.extractor().feature_space
    registry = HeadRegistry(store.heads, space, pinned_cache=2)
    registry.load_all()
    assert registry.get("colors").version == 1
    first = registry.get_version("colors", 2)
    assert registry.get_version("colors", 2) is first  # no second load
    assert registry.get_version("colors", 1) is registry.get("colors")  # the served one
    card = store.heads.version_folder("colors", 2) / CARD
    atomic_write(card, card.read_bytes())  # the same bytes in a new file: loaded and verified again
    again = registry.get_version("colors", 2)
    assert again is not first and registry.get_version("colors", 2) is again
    atomic_write(card, card.read_bytes().replace(b'"version": 2', b'"version": 1'))  # now a lie: refused at once
    with pytest.raises(Exception, match="card is version 1's"):
        registry.get_version("colors", 2)
    uncached = HeadRegistry(store.heads, space, pinned_cache=0)
    atomic_write(card, card.read_bytes().replace(b'"version": 1', b'"version": 2'))
    assert uncached.get_version("colors", 2) is not uncached.get_version("colors", 2)


def _io_read_bytes(pid: int) -> int:
    """Bytes the process has read by read(2) and friends (files and sockets): /proc/PID/io ``rchar``."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_compare_extracts_the_validation_set_once_and_is_bounded(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    """A second compare reads no validation photo again (measured: the server's read bytes), and answers
    the same; compare_concurrency bounds how many a replica scores at once (429 beyond it)."""
    server = server_factory(fresh_tiny_store, default_head="colors", job_heartbeat_s=0.5)
    photos = {label: [image_bytes(color, "PNG", size=(640, 640), noise=60, seed=i) for i in range(8)]
              for label, color in (("red", (210, 40, 40)), ("blue", (40, 40, 210)))}  # fmt: skip
    smallest = min(len(p) for ps in photos.values() for p in ps)  # ~1.2 MB
    for first, n in ((0, 6), (6, 2)):
        files = [
            (label, (f"{label}{i}.png", ps[i], "image/png")) for label, ps in photos.items() for i in range(first, first + n)
        ]
        r = httpx.post(f"{server.url}/v1/heads/pets/train", files=files, data={"val_fraction": "0.4"}, timeout=60, headers=ADMIN)
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while (job := httpx.get(server.url + r.headers["location"]).json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
    assert server.proc is not None
    url = f"{server.url}/v1/heads/pets/compare?a=1&b=2"
    before = _io_read_bytes(server.proc.pid)
    one = httpx.get(url, timeout=60)
    middle = _io_read_bytes(server.proc.pid)
    two = httpx.get(url, timeout=60)
    after = _io_read_bytes(server.proc.pid)
    assert one.status_code == 200 and two.json() == one.json(), one.text
    validation = one.json()["validation_images"]
    assert validation >= 4
    assert middle - before >= validation * smallest  # the first compare read (and hashed) every validation photo
    # the second read none of them (what it does read, ~0.5 MB a call here, does not grow with the photos)
    assert after - middle < smallest, (middle - before, after - middle)


def test_compare_concurrency_is_a_named_limit(fresh_tiny_store: ModelStore) -> None:
    from app.core.errors import TooManyJobs
    from app.core.settings import Settings
    from app.learning.jobs import JobRunner
    from app.serving.service import Service

    runner = JobRunner(Service(Settings(model_store=fresh_tiny_store.root, compare_concurrency=1, intra_op_threads=1)))
    with runner.comparing():
        with pytest.raises(TooManyJobs, match="compare_concurrency=1") as refused, runner.comparing():
            pass
        assert refused.value.status_code == 429
    with runner.comparing():  # the place is given back
        pass
