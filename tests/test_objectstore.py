"""Heads on an object store (app/storage/objectstore.py, app/storage/mirror.py) against a real S3-compatible HTTP server:
moto's server mode on a loopback port, reached through the same obstore client and AWS_* variables a
user points at AWS S3 or MinIO. moto 5.2 honours both conditional writes (``If-None-Match: *`` answers
409/412, a stale ``If-Match`` 412): test_conditional_writes_are_honoured checks that, so the race tests
below exercise the server's real preconditions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.errors import StoreUnavailable, UntrustedHead, VersionConflict
from app.core.signing import generate, load_private_key, load_public_keys
from app.storage.mirror import MirroredHeadStore
from app.storage.objectstore import ObjectStore
from app.storage.registry import HeadKeys, HeadStore, load_head, save_head
from app.storage.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, free_port, image_bytes

moto_server = pytest.importorskip("moto.server", reason="the s3 tests need moto[server] (pip install 'tlserve[s3]' moto[server])")
pytest.importorskip("obstore", reason="the s3 extra (obstore) is not installed")

BUCKET = "tlserve-test"


class S3Server:
    """moto's S3 server in this process; stop()/start() keep its objects (they live in moto's backend)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_REGION": "us-east-1"}  # fmt: skip


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"{BUCKET}-{server.port}"
    assert httpx.put(f"{server.endpoint}/{bucket}").status_code == 200
    server.bucket = bucket  # type: ignore[attr-defined]
    yield server
    server.stop()


def url(s3: S3Server, prefix: str = "store") -> str:
    return f"s3://{s3.bucket}/{prefix}"  # type: ignore[attr-defined]


def mirrored(s3: S3Server, cache: Path, keys: HeadKeys | None = None) -> MirroredHeadStore:
    return MirroredHeadStore(cache, keys or HeadKeys(), ObjectStore(url(s3), timeout_s=2, max_retries=0))


def publish(tiny_store: ModelStore, heads: HeadStore, *, promote: bool = True, flip: bool = False) -> int:
    """A new version of ``colors``; with ``flip`` its weights are negated, so red photos answer blue."""
    head = load_head(tiny_store.heads, "colors")
    if flip:
        head.estimator.coef_ = -head.estimator.coef_
        head.estimator.intercept_ = -head.estimator.intercept_
    card = {k: v for k, v in head.card.items() if k not in ("name", "signature", "familiarity")}
    return save_head(heads, "colors", head.estimator, card, promote=promote).version


def test_conditional_writes_are_honoured(s3: S3Server) -> None:
    objects = ObjectStore(url(s3))
    assert objects.create("k", b"1")
    assert not objects.create("k", b"2"), "If-None-Match: * must refuse an existing object"
    got = objects.get("k", 10)
    assert got is not None and got.data == b"1"
    assert objects.swap("k", b"3", got.etag)
    assert not objects.swap("k", b"4", got.etag), "a stale If-Match must be refused"
    assert not objects.swap("k", b"5", None), "swap from absent is create-only"
    assert objects.get("k", 10).data == b"3"  # type: ignore[union-attr]
    assert objects.get("absent", 10) is None
    with pytest.raises(Exception, match="over the limit of 0"):
        objects.get("k", 0)


def test_a_version_written_on_one_replica_is_verified_and_served_from_anothers_mirror(
    s3: S3Server, tmp_path: Path, tiny_store: ModelStore
) -> None:
    trainer, server = mirrored(s3, tmp_path / "a"), mirrored(s3, tmp_path / "b")
    assert publish(tiny_store, trainer) == 1
    assert publish(tiny_store, trainer, promote=False) == 2
    assert server.names() == []  # nothing mirrored before a refresh
    assert server.refresh() and server.stale_since is None
    assert server.names() == ["colors"] and server.versions("colors") == [1, 2]
    assert server.current_version("colors") == 1  # promote=False left current where it was
    assert load_head(server, "colors").version == 1
    trainer.promote("colors", 2, expected=1)
    with pytest.raises(VersionConflict):
        trainer.promote("colors", 1, expected=1)
    server.refresh()
    assert load_head(server, "colors").version == 2
    keys = ObjectStore(url(s3)).keys("heads/colors/")
    assert {"heads/colors/.claims/1", "heads/colors/.claims/2", "heads/colors/current", "heads/colors/2/card.json"} <= set(keys)


def test_a_verify_only_mirror_serves_signed_versions_and_refuses_unsigned_ones(
    s3: S3Server, tmp_path: Path, tiny_store: ModelStore
) -> None:
    pem, public = generate()
    signer = HeadKeys(load_private_key(pem.decode()), {})
    verifier = HeadKeys(None, load_public_keys(public))
    publish(tiny_store, mirrored(s3, tmp_path / "unsigned"))  # version 1: written without a key
    publish(tiny_store, mirrored(s3, tmp_path / "trainer", signer), promote=False)  # version 2: signed
    server = mirrored(s3, tmp_path / "server", verifier)
    server.refresh()
    with pytest.raises(UntrustedHead):
        load_head(server, "colors", version=1)
    assert load_head(server, "colors", version=2).version == 2


def test_version_ids_are_never_reused_and_deletes_reach_the_mirror(s3: S3Server, tmp_path: Path, tiny_store: ModelStore) -> None:
    heads = mirrored(s3, tmp_path / "a")
    for _ in range(3):
        publish(tiny_store, heads, promote=False)
    heads.delete_version("colors", 3)
    assert heads.versions("colors") == [1, 2]
    assert publish(tiny_store, heads, promote=False) == 4  # 3 was claimed once: never again
    heads.delete("colors")
    assert heads.names() == []
    assert publish(tiny_store, heads) == 5


def test_a_tampered_or_unlisted_object_is_never_served(s3: S3Server, tmp_path: Path, tiny_store: ModelStore) -> None:
    trainer, server = mirrored(s3, tmp_path / "a"), mirrored(s3, tmp_path / "b")
    publish(tiny_store, trainer)
    objects = ObjectStore(url(s3))
    version = trainer.get("colors")
    pickle = version.info.pickle
    objects.put(f"heads/colors/1/{pickle}", b"not the pickle")  # replaced after commit: sha256 differs
    server.refresh()
    assert server.names() == []  # not mirrored: its card names other bytes
    objects.put("heads/colors/1/evil.txt", b"x")  # unlisted files are never copied
    objects.put(f"heads/colors/1/{pickle}", version.read(pickle))
    server.refresh()
    assert load_head(server, "colors").version == 1
    assert not (server.folder("colors") / "1" / "evil.txt").exists()


def test_an_unreachable_store_keeps_the_mirror_serving_and_refuses_writes_until_it_is_back(
    s3: S3Server, tmp_path: Path, tiny_store: ModelStore
) -> None:
    heads = mirrored(s3, tmp_path / "a")
    publish(tiny_store, heads)
    s3.stop()
    try:
        assert not heads.refresh()
        assert heads.stale_since is not None and heads.stale_seconds() >= 0
        assert load_head(heads, "colors").version == 1  # the last verified head is still served
        with pytest.raises(StoreUnavailable) as err:
            publish(tiny_store, heads)
        assert err.value.status_code == 503 and err.value.retry_after_s > 0 and err.value.code == "store_unavailable"
        with pytest.raises(StoreUnavailable):
            heads.promote("colors", 1)
    finally:
        s3.start()
    assert heads.refresh() and heads.stale_since is None
    assert publish(tiny_store, heads) == 2  # nothing was half-claimed by the failed writes
    assert heads.current_version("colors") == 2


RACER = """
import json, sys
from app.core.errors import VersionConflict
from app.storage.mirror import MirroredHeadStore
from app.storage.objectstore import ObjectStore
from app.storage.registry import HeadKeys
heads = MirroredHeadStore(__import__("pathlib").Path(sys.argv[2]), HeadKeys(), ObjectStore(sys.argv[1]))
won, lost = [], 0
while len(won) < int(sys.argv[3]):
    remote = heads._remote("colors")
    now = remote.served()
    try:
        heads.promote("colors", now + 1, expected=now)
        won.append(now)
    except VersionConflict:
        lost += 1
print(json.dumps({"won": won, "lost": lost}))
"""


@pytest.mark.slow
def test_two_processes_racing_promotions_lose_no_update(s3: S3Server, tmp_path: Path, tiny_store: ModelStore) -> None:
    """Each process moves ``current`` from N to N+1 with a compare-and-swap, many rounds: were an update
    lost (two swaps from the same N both accepted), ``current`` would end below 1 + every accepted swap."""
    rounds = 15
    heads = mirrored(s3, tmp_path / "seed")
    for _ in range(2 * rounds + 1):
        publish(tiny_store, heads, promote=False)
    heads.promote("colors", 1)
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, url(s3), str(tmp_path / f"r{i}"), str(rounds)],
                               env=env, stdout=subprocess.PIPE, cwd=REPO) for i in range(2)]  # fmt: skip
    results = [json.loads(p.communicate(timeout=300)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    won = [n for r in results for n in r["won"]]
    assert sorted(won) == list(range(1, 2 * rounds + 1)), "every step from N to N+1 was taken exactly once"
    heads.refresh()
    assert heads.current_version("colors") == 2 * rounds + 1


SAVER = """
import pickle, sys
from pathlib import Path
from app.storage.mirror import MirroredHeadStore
from app.storage.objectstore import ObjectStore
from app.storage.registry import HeadKeys
heads = MirroredHeadStore(Path(sys.argv[2]), HeadKeys(), ObjectStore(sys.argv[1]))
assert heads.refresh()
template = heads.get("colors", 1)
files = {f: template.read(f) for f in template.artifacts}
card = {k: v for k, v in template.card.items() if k not in ("schema", "version", "artifacts", "name", "created_at")}
for i in range(int(sys.argv[3])):
    v = heads.save("colors", {**files, "who.txt": f"{sys.argv[4]}-{i}".encode()}, card, promote=True)
    print(v.version, flush=True)
"""


@pytest.mark.slow
def test_two_processes_saving_at_once_get_distinct_ids_and_lose_no_version(
    s3: S3Server, tmp_path: Path, tiny_store: ModelStore
) -> None:
    each = 8
    heads = mirrored(s3, tmp_path / "seed")
    publish(tiny_store, heads)
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO)}
    savers = [subprocess.Popen([sys.executable, "-c", SAVER, url(s3), str(tmp_path / f"s{i}"), str(each), f"p{i}"],
                               env=env, stdout=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0].split() for p in savers]
    assert all(p.returncode == 0 for p in savers)
    ids = [int(v) for out in outs for v in out]
    assert len(ids) == len(set(ids)) == 2 * each
    heads.refresh()
    assert heads.versions("colors") == [1, *sorted(ids)]
    written = {heads.get("colors", v).read("who.txt").decode() for v in ids}  # every version whole and verified
    assert written == {f"p{p}-{i}" for p in range(2) for i in range(each)}
    assert heads.current_version("colors") in ids


RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)


def label(server: ServerProcess) -> tuple[int, str | None, int | None]:
    r = httpx.post(f"{server.url}/v1/classify", content=RED, headers={"content-type": "image/png"})
    body = r.json()
    return r.status_code, (body.get("results") or [{}])[0].get("label"), body.get("version")


def stale_seconds(server: ServerProcess) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("tlserve_store_stale_seconds "):
            return float(line.split()[1])
    raise AssertionError("no tlserve_store_stale_seconds in /metrics")


@pytest.mark.slow
def test_replicas_on_one_object_store_follow_a_promotion_and_ride_out_an_outage(
    s3: S3Server, tmp_path: Path, fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    """Two real ``tlserve serve`` processes whose heads are on the S3 server (no shared folder): a promotion
    on one reaches the other within its poll interval; with the store down both stay ready and keep
    answering from their mirrors, a promotion is a 503 store_unavailable with Retry-After, and it works
    once the store is back."""
    store = fresh_tiny_store
    seed = mirrored(s3, tmp_path / "seed")
    publish(store, seed)
    v2 = publish(store, seed, promote=False, flip=True)
    settings = {"default_head": "colors", "head_poll_interval_s": "0.2", "head_store": url(s3), "store_timeout_s": "2"}
    a = server_factory(store, head_cache_dir=str(tmp_path / "a"), **settings)
    b = server_factory(store, head_cache_dir=str(tmp_path / "b"), **settings)
    assert label(a) == label(b) == (200, "red", 1)
    assert httpx.post(f"{a.url}/v1/heads/colors/promote", json={"version": v2}, headers=ADMIN).status_code == 200
    assert label(a) == (200, "blue", v2)
    deadline = time.monotonic() + 10
    while label(b)[2] != v2:
        assert time.monotonic() < deadline, "replica b never served the version promoted on a"
        time.sleep(0.1)

    s3.stop()
    try:
        deadline = time.monotonic() + 20
        while stale_seconds(b) == 0 or stale_seconds(a) == 0:
            assert time.monotonic() < deadline, "a replica never reported the store stale"
            time.sleep(0.2)
        for path in ("train", "examples", "promote"):  # refused at once, before a body is read or a job starts
            r = httpx.post(f"{a.url}/v1/heads/colors/{path}", headers=ADMIN, json={"version": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", (path, r.text)
            assert "unreachable since" in r.json()["error"]["message"] and int(r.headers["retry-after"]) > 0
        assert httpx.get(f"{b.url}/readyz").status_code == 200
        assert label(b) == (200, "blue", v2)
        r = httpx.post(f"{a.url}/v1/heads/colors/rollback", headers=ADMIN, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert int(r.headers["retry-after"]) > 0
        assert label(a) == (200, "blue", v2)
    finally:
        s3.start()
    deadline = time.monotonic() + 20
    while True:
        r = httpx.post(f"{a.url}/v1/heads/colors/rollback", headers=ADMIN, timeout=30)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while label(b)[2] != 1 or stale_seconds(b) != 0:
        assert time.monotonic() < deadline, "replica b never caught up once the store was back"
        time.sleep(0.1)
