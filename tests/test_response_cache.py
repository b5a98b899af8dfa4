"""The response cache: a repeated image skips decode and inference, answers the same, is counted as
cached (never as inferred), is bounded, keyed by extractor, and can be turned off."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import numpy as np

from app.serving.response_cache import ResponseCache
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes

RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)
BLUE = image_bytes((40, 40, 210), "PNG", size=(32, 32), noise=15)


def counts(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for m in re.finditer(
        r"^(tlserve_images_total|tlserve_response_cache_total|tlserve_batch_size_images_count)(\{[^}]*\})? (\S+)$", text, re.M
    ):
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def classify(server: ServerProcess, *images: bytes, **params: object) -> httpx.Response:
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{server.url}/v1/classify", params=params, files=files, timeout=30)


def test_repeated_images_are_answered_from_the_cache(
    tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(tiny_store, default_head="colors", response_cache_size=8)
    first = classify(server, RED, BLUE).json()["results"]
    batches = counts(server)["tlserve_batch_size_images_count"]
    again = classify(server, BLUE, RED).json()["results"]
    assert [r["label"] for r in again] == ["blue", "red"]
    assert again[0]["probabilities"] == first[1]["probabilities"] and again[1]["probabilities"] == first[0]["probabilities"]
    c = counts(server)
    assert c["tlserve_batch_size_images_count"] == batches  # no engine run for the second request
    assert c['tlserve_images_total{endpoint="classify",head="colors",outcome="ok"}'] == 2
    assert c['tlserve_images_total{endpoint="classify",head="colors",outcome="cached"}'] == 2
    assert c['tlserve_response_cache_total{result="hit"}'] == 2 and c['tlserve_response_cache_total{result="miss"}'] == 2
    top = classify(server, RED, top_k=1).json()["results"][0]  # other options reuse the features
    assert top["top_k"][0]["label"] == "red" and top["top_k"][0]["probability"] == first[0]["confidence"]
    emb = httpx.post(f"{server.url}/v1/embed", content=RED, headers={"content-type": "image/png"}).json()
    assert len(emb["results"][0]["embedding"]) == tiny_store.extractor().feature_dim


def test_cache_off_sends_every_image_to_the_engine(tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(tiny_store, default_head="colors", response_cache_size=0)
    for _ in range(2):
        assert classify(server, RED).status_code == 200
    c = counts(server)
    assert c['tlserve_images_total{endpoint="classify",head="colors",outcome="ok"}'] == 2
    assert not any("cached" in k or "response_cache" in k for k in c)


def test_lru_is_bounded_and_keyed_by_extractor() -> None:
    cache = ResponseCache(2)
    a, b, c = (cache.key("fp32", x) for x in (b"a", b"b", b"c"))
    for k, v in ((a, 1.0), (b, 2.0)):
        cache.put(k, np.full(3, v, np.float32))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, np.zeros(3, np.float32))
    assert len(cache) == 2 and cache.get(b) is None and cache.get(a) is not None
    assert cache.get(cache.key("int8", b"a")) is None  # another extractor's features are never reused
    vector = cache.get(a)
    assert vector is not None and not vector.flags.writeable
