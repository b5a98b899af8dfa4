"""The review queue from production (app/serving/review.py, app/api/review.py): off by default, caps and retention,
labelling into the example store, admin-only routes, sampling that never fails a request."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core.errors import ArtifactError, ReviewItemNotFound
from app.core.hashing import sha256_bytes
from app.core.settings import Settings
from app.serving.inference import Decoded, InferResult
from app.serving.inference import Item as Photo
from app.serving.metrics import Metrics
from app.serving.review import Item, Limits, ReviewQueue, Sampler, most_useful_first
from app.storage.examples import ExampleStore
from app.storage.registry import HeadKeys, HeadStore, load_head
from app.storage.store import ModelStore
from tests.helpers import ADMIN, ServerProcess, image_bytes

PNG = {"Content-Type": "image/png"}
UNCERTAIN = image_bytes((202, 40, 47), seed=3, size=(43, 39))  # the tiny head: red, ~0.73, in distribution
UNFAMILIAR = image_bytes((40, 210, 40), "PNG", size=(32, 32), noise=15)  # confident, not in distribution
SURE = image_bytes((210, 40, 40), seed=3, size=(43, 39))  # red, ~1.0 (the calibrated tiny head), in distribution
ENABLED = {"default_head": "colors", "review_heads": "colors", "review_confidence": 0.95, "review_sample_rate": 1}


def photo(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "big") * (size // 4)


def item(data: bytes, *, at: datetime | None = None, margin: float = 0.5, ind: bool | None = True,
         fam: float | None = None) -> Item:  # fmt: skip
    t = (at or datetime.now(UTC)).isoformat(timespec="seconds")
    conf = (1 + margin) / 2
    return Item(sha256_bytes(data), "red", conf, margin, {"blue": 1 - conf, "red": conf}, fam, ind,
                "low_confidence" if ind else "unfamiliar", 1, t, t, 1, len(data))  # fmt: skip


def limits(**kw: object) -> Limits:
    base: dict[str, object] = {"max_items": 100, "max_bytes": 10**6, "max_age": timedelta(days=30), "max_photo_bytes": 10**5}
    return Limits(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def heads(tmp_path: Path) -> HeadStore:
    return HeadStore(tmp_path / "heads", HeadKeys())


def objects(q: ReviewQueue) -> set[str]:
    return {p.name for p in (q.folder / "objects").glob("*/*")}


# --- the queue on disk ------------------------------------------------------------------------------


def test_caps_by_count_and_bytes_evict_the_oldest_and_delete_their_bytes(heads: HeadStore) -> None:
    q = ReviewQueue(heads, "colors", limits(max_items=3))
    start = datetime.now(UTC) - timedelta(hours=1)
    shas = []
    for i in range(5):
        data = photo(i)
        outcome, gone = q.add(item(data, at=start + timedelta(minutes=i)), data)
        assert outcome == "queued"
        assert gone == ({"evicted": 1} if i >= 3 else {})
        shas.append(sha256_bytes(data))
    assert {i.sha256 for i in q.items()[0]} == set(shas[2:]) == objects(q)  # the two oldest left, bytes and all

    q = ReviewQueue(heads, "other", limits(max_bytes=250))  # 100 bytes a photo: two fit
    for i in range(4):
        q.add(item(photo(i), at=start + timedelta(minutes=i)), photo(i))
    assert q.size() == (2, 200) and objects(q) == {sha256_bytes(photo(2)), sha256_bytes(photo(3))}
    assert q.add(item(photo(9, 300)), photo(9, 300))[0] == "too_large"  # one photo over the byte cap alone
    assert q.size() == (2, 200)


def test_retention_by_age_removes_old_photos_on_listing_and_at_start(heads: HeadStore, tmp_path: Path) -> None:
    q = ReviewQueue(heads, "colors", limits(max_age=timedelta(days=1)))
    old, new = photo(1), photo(2)
    q.add(item(old, at=datetime.now(UTC) - timedelta(days=2)), old)  # itself expired at once
    assert q.size() == (0, 0) and objects(q) == set()
    q.add(item(new), new)
    # an item that aged on disk (a server that was down): the listing enforces the limit before it answers
    doc = json.loads((q.folder / "queue.json").read_text())
    doc["items"][sha256_bytes(new)]["queued_at"] = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    (q.folder / "queue.json").write_text(json.dumps(doc))
    assert q.items() == ([], {"expired": 1}) and objects(q) == set()

    q.add(item(new), new)  # and the service's writer sweeps every queue when it starts, the head on or off
    doc = json.loads((q.folder / "queue.json").read_text())
    doc["items"][sha256_bytes(new)]["queued_at"] = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    (q.folder / "queue.json").write_text(json.dumps(doc))
    settings = Settings(model_store=tmp_path, review_max_age_days=1)
    sampler = Sampler(settings, heads, metrics := Metrics())
    sampler.start()
    sampler.stop()
    assert objects(q) == set() and metrics.registry.get_sample_value(
        "tlserve_review_outcomes_total", {"head": "colors", "outcome": "expired"}) == 1  # fmt: skip


def test_the_same_bytes_are_stored_once_and_keep_their_first_time(heads: HeadStore) -> None:
    q = ReviewQueue(heads, "colors", limits())
    data = photo(7)
    first = item(data, at=datetime.now(UTC) - timedelta(hours=2))
    assert q.add(first, data)[0] == "queued"
    assert q.add(item(data, margin=0.1), data)[0] == "again"
    (got,), _ = q.items()
    assert got.seen == 2 and got.queued_at == first.queued_at and got.margin == 0.1 and len(objects(q)) == 1
    assert q.add(item(photo(8)), photo(8), known={sha256_bytes(photo(8))})[0] == "known"  # already an example


def test_most_useful_first_puts_unfamiliar_then_low_margin_ahead() -> None:
    sure, unsure = item(photo(1), margin=0.9), item(photo(2), margin=0.05)
    odd, odder = item(photo(3), margin=0.9, ind=False, fam=-1.0), item(photo(4), margin=0.9, ind=False, fam=-5.0)
    assert most_useful_first([sure, odd, unsure, odder]) == [odder, odd, unsure, sure]


def test_nothing_on_disk_is_trusted(heads: HeadStore) -> None:
    q = ReviewQueue(heads, "colors", limits())
    good, bad = photo(1), photo(2)
    q.add(item(good), good)
    q.add(item(bad), bad)
    doc = json.loads((q.folder / "queue.json").read_text())
    doc["items"]["not-a-sha"] = {"label": "x"}
    doc["items"][sha256_bytes(bad)]["confidence"] = "high"
    (q.folder / "queue.json").write_text(json.dumps(doc))
    assert [i.sha256 for i in q.items()[0]] == [sha256_bytes(good)]  # the others skipped, then dropped
    assert set(json.loads((q.folder / "queue.json").read_text())["items"]) == {sha256_bytes(good)}
    q.path(sha256_bytes(good)).write_bytes(photo(3))  # swapped bytes
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        q.photo(sha256_bytes(good))
    with pytest.raises(ReviewItemNotFound, match="64 hex"):
        q.photo("../../etc/passwd")
    (q.folder / "queue.json").write_text("{not json")
    assert q.items() == ([], {})  # a queue file that does not parse starts the queue again


def test_labelling_moves_the_photo_into_the_example_store_and_relabels_the_same_bytes(heads: HeadStore) -> None:
    q = ReviewQueue(heads, "colors", limits())
    examples = ExampleStore(heads, "colors")
    data = photo(5)
    sha = sha256_bytes(data)
    q.add(item(data), data)
    got, snap = q.label(sha, "blue", examples)
    assert got.label == "red" and snap.added == 1 and examples.snapshot().examples[sha].label == "blue"
    assert examples.path(sha).read_bytes() == data and q.size() == (0, 0) and objects(q) == set()
    with pytest.raises(ReviewItemNotFound):
        q.label(sha, "blue", examples)
    q.add(item(data), data)  # sent again (queued before anyone saw it was an example): a correction relabels
    _, snap = q.label(sha, "red", examples)
    assert snap.relabelled == 1 and examples.snapshot().examples[sha].label == "red"
    q.add(item(data), data)
    with pytest.raises(Exception, match="invalid class label"):
        q.label(sha, "../x", examples)
    assert q.size()[0] == 1  # a refused label leaves the photo queued


def test_sampling_hands_off_without_waiting_and_counts_what_it_drops(tiny_store: ModelStore, tmp_path: Path) -> None:
    head = load_head(tiny_store.heads, "colors")
    settings = Settings(model_store=tmp_path, review_heads="colors", review_pending=2, review_sample_rate=1,
                        review_confidence=0.8, review_max_photo_bytes=150)  # fmt: skip
    metrics = Metrics()
    sampler = Sampler(settings, HeadStore(tmp_path / "heads", HeadKeys()), metrics)  # writer not started: nothing drains
    datas = [photo(i) for i in range(5)] + [photo(9, 200), photo(10)]
    proba = np.array([[0.4, 0.6]] * 6 + [[0.01, 0.99]], np.float32)  # the last one is sure: not a candidate
    decoded = [Decoded(Photo(d), np.zeros(1), None) for d in datas]
    result = InferResult(decoded, np.zeros((7, 4), np.float32), head, proba)
    assert sampler.offer("colors", 1, result) == 2
    value = metrics.registry.get_sample_value
    assert value("tlserve_review_sampled_total", {"head": "colors", "outcome": "dropped_full"}) == 3
    assert value("tlserve_review_sampled_total", {"head": "colors", "outcome": "too_large"}) == 1
    assert value("tlserve_review_pending_photos", {}) == 2
    assert sampler.offer("other", 1, result) == 0  # a head not listed is never sampled

    assert Settings().review_head_names == frozenset()  # off by default
    with pytest.raises(ValueError, match="review_heads"):
        Settings(review_heads="colors,../x")


# --- over HTTP, real servers -------------------------------------------------------------------------


def classify(server: ServerProcess, data: bytes) -> dict[str, object]:
    r = httpx.post(f"{server.url}/v1/classify", content=data, headers={**PNG, **ADMIN})  # an admin key serves inference
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def listing(server: ServerProcess, count: int | None = None) -> dict:
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{server.url}/v1/heads/colors/review", headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        if count is None or body["count"] == count or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def sampled(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=ADMIN).text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^tlserve_review_sampled_total\{head="colors",outcome="(\w+)"\} (\S+)$', text, re.M)
    }


def test_the_queue_is_off_by_default_and_a_disabled_queue_stores_nothing(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(fresh_tiny_store, default_head="colors", review_confidence=1, review_sample_rate=1)
    for data in (UNCERTAIN, UNFAMILIAR, SURE):
        classify(server, data)
    body = listing(server)
    assert body["enabled"] is False and body["count"] == 0 and body["items"] == []
    assert not fresh_tiny_store.heads.review_dir("colors").exists()
    assert sampled(server) == {}


def test_uncertain_and_unfamiliar_answers_are_queued_labelled_and_dismissed_with_an_admin_key(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(fresh_tiny_store, api_keys="k-infer", **ENABLED)
    user = {"X-API-Key": "k-infer"}
    answers = [httpx.post(f"{server.url}/v1/classify", content=d, headers={**PNG, **user}).json()["results"][0]
               for d in (UNCERTAIN, UNFAMILIAR, SURE, UNCERTAIN)]  # fmt: skip
    assert answers[0]["confidence"] < 0.95 and answers[0]["in_distribution"] is True  # the premises
    assert answers[1]["in_distribution"] is False and answers[2]["confidence"] > 0.95 and answers[2]["in_distribution"]
    url = f"{server.url}/v1/heads/colors/review"
    for headers, status in (({}, 401), (user, 403)):  # users' photos: admin keys only, every route
        assert httpx.get(url, headers=headers).status_code == status
        assert httpx.post(f"{url}/{'0' * 64}/label", json={"label": "red"}, headers=headers).status_code == status
        assert httpx.delete(f"{url}/{'0' * 64}", headers=headers).status_code == status

    deadline = time.monotonic() + 30
    while sampled(server).get("again", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    body = listing(server, 2)
    assert body["enabled"] and body["count"] == 2 and body["bytes"] == len(UNCERTAIN) + len(UNFAMILIAR)
    first, second = body["items"]  # unfamiliar first
    assert first["sha256"] == sha256_bytes(UNFAMILIAR) and first["reason"] == "unfamiliar" and first["version"] == 1
    assert second["sha256"] == sha256_bytes(UNCERTAIN) and second["reason"] == "low_confidence" and second["seen"] == 2
    assert second["label"] == answers[0]["label"] and abs(second["confidence"] - answers[0]["confidence"]) < 1e-3
    assert sampled(server) == {"queued": 2, "again": 1}
    r = httpx.get(server.url + second["photo"], headers=ADMIN)
    assert r.status_code == 200 and r.content == UNCERTAIN and r.headers["content-type"] == "image/png"

    r = httpx.post(f"{url}/{second['sha256']}/label", json={"label": "blue"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"head": "colors", "sha256": second["sha256"], "label": "blue", "guess": "red",
                        "confirmed": False, "relabelled": False, "examples": {"blue": 1}}  # fmt: skip
    assert ExampleStore(fresh_tiny_store.heads, "colors").path(second["sha256"]).read_bytes() == UNCERTAIN
    r = httpx.post(f"{url}/{second['sha256']}/label", json={"label": "blue"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "review_item_not_found"
    r = httpx.post(f"{url}/{first['sha256']}/label", json={"label": "no such/label"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_label"
    assert httpx.delete(f"{url}/{first['sha256']}", headers=ADMIN).json() == {"head": "colors", "dismissed": first["sha256"]}
    assert listing(server)["count"] == 0 and not any(fresh_tiny_store.heads.review_dir("colors").glob("objects/*/*"))
    classify(server, UNCERTAIN)  # an example now: not queued again
    deadline = time.monotonic() + 30
    while "known" not in sampled(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sampled(server)["known"] == 1 and listing(server)["count"] == 0
    metrics = httpx.get(f"{server.url}/metrics", headers=ADMIN).text
    assert 'tlserve_review_outcomes_total{head="colors",outcome="corrected"} 1.0' in metrics
    assert 'tlserve_review_outcomes_total{head="colors",outcome="dismissed"} 1.0' in metrics
    assert 'tlserve_review_queue_items{head="colors"} 0.0' in metrics
    assert httpx.get(f"{server.url}/v1/heads/nope/review", headers=ADMIN).status_code == 404


def test_a_queue_that_cannot_be_written_never_fails_a_request(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    fresh_tiny_store.heads.review_dir("colors").write_bytes(b"a file where the queue's folder goes")
    server = server_factory(fresh_tiny_store, **ENABLED)
    for _ in range(3):
        assert classify(server, UNFAMILIAR)["in_distribution"] is False
    deadline = time.monotonic() + 30
    while sampled(server).get("failed", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sampled(server) == {"failed": 3}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
