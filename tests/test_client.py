"""tlserve_client against a real server: typed results, errors, and 503 retries honouring Retry-After."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from tlserve_client import AsyncClient, Client, ClientError

from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes

RED, BLUE = (210, 40, 40), (40, 40, 210)
PNG_RED = image_bytes(RED, "PNG", size=(40, 36), seed=1)
JPEG_BLUE = image_bytes(BLUE, "JPEG", size=(48, 40), seed=2)


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def raw_classify(server: ServerProcess, images: list[tuple[str, bytes]], **params: object) -> dict:
    files = [("files", (name, data, "application/octet-stream")) for name, data in images]
    return httpx.post(server.url + "/v1/classify", files=files, params=params, timeout=30).json()


def metric(server: ServerProcess, prefix: str) -> float:
    lines = [line for line in httpx.get(server.url + "/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_ready_info_models(client: Client) -> None:
    assert client.ready() is True
    info = client.info()
    assert info["ready"] is True and info["default_head"] == "colors"
    models = client.models()
    assert models.default == "colors"
    assert [(m.name, sorted(m.classes), m.loaded) for m in models.models] == [("colors", ["blue", "red"], True)]


def test_classify_paths_bytes_and_pairs_equal_raw_api(client: Client, server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(PNG_RED)
    result = client.classify([tmp_path / "red.png", str(tmp_path / "red.png"), JPEG_BLUE, ("blue.jpg", JPEG_BLUE)])
    raw = raw_classify(server, [("red.png", PNG_RED), ("red.png", PNG_RED), ("image2", JPEG_BLUE), ("blue.jpg", JPEG_BLUE)])
    assert result.head == raw["head"] == "colors"
    assert [r.model_dump(exclude_none=True) for r in result.results] == raw["results"]
    assert [r.label for r in result.results] == ["red", "red", "blue", "blue"]
    assert [r.file for r in result.results] == ["red.png", "red.png", "image2", "blue.jpg"]


def test_classify_single_image_top_k_and_head(client: Client) -> None:
    result = client.classify(PNG_RED, head="colors", top_k=1)
    (only,) = result.results
    assert only.probabilities is None and only.top_k is not None
    assert [(t.label, t.probability) for t in only.top_k] == [(only.label, only.confidence)]


def test_partial_failure_is_a_result_total_failure_an_error(client: Client) -> None:
    result = client.classify([("good.png", PNG_RED), ("bad.txt", b"plain text, not an image")])
    good, bad = result.results
    assert good.label == "red" and good.error is None
    assert bad.label is None and bad.error is not None and bad.error.code == "unsupported_format" and bad.error.status == 415
    with pytest.raises(ClientError) as err:
        client.classify([("bad.txt", b"plain text")])
    assert err.value.status == 415 and err.value.code == "unsupported_format" and err.value.request_id


def test_client_errors_carry_code_and_status(client: Client) -> None:
    with pytest.raises(ClientError) as err:
        client.classify(PNG_RED, head="no_such_head")
    assert (err.value.status, err.value.code) == (404, "head_not_found") and "no_such_head" in err.value.message
    with pytest.raises(ClientError) as err:
        client.classify(PNG_RED, top_k=0)
    assert err.value.status == 422
    with pytest.raises(FileNotFoundError):
        client.classify(["/no/such/file.png"])


def test_embed(client: Client, server: ServerProcess) -> None:
    raw = client.embed([PNG_RED, JPEG_BLUE])
    unit = client.embed([PNG_RED, JPEG_BLUE], normalize=True)
    assert raw.dim == unit.dim == len(raw.results[0].embedding or []) and not raw.normalized and unit.normalized
    vectors = np.array([r.embedding for r in raw.results])
    np.testing.assert_allclose(np.array([r.embedding for r in unit.results]),
                               vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_async_client_matches_sync(client: Client, server: ServerProcess) -> None:
    async def run() -> tuple:
        async with AsyncClient(server.url) as ac:
            return (
                await ac.ready(),
                await ac.models(),
                await ac.info(),
                await ac.classify([PNG_RED, JPEG_BLUE]),
                await ac.embed(PNG_RED),
            )

    ready, models, info, classified, embedded = asyncio.run(run())
    assert ready and models == client.models() and info["version"] == client.info()["version"]
    assert classified.results == client.classify([PNG_RED, JPEG_BLUE]).results
    assert embedded.results[0].embedding == client.embed(PNG_RED).results[0].embedding


def test_api_key(server_factory, tiny_store: ModelStore) -> None:
    server = server_factory(tiny_store, default_head="colors", api_keys="sesame")
    with Client(server.url) as anonymous, pytest.raises(ClientError) as err:
        anonymous.models()
    assert (err.value.status, err.value.code) == (401, "unauthorized")
    with Client(server.url, api_key="sesame") as keyed:
        assert keyed.models().default == "colors" and keyed.classify(PNG_RED).results[0].label == "red"


# --- 503: a real server with a one-image queue -----------------------------------------------------
@pytest.fixture(scope="module")
def tight_server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors", max_queue_size=1, max_batch_size=1, decode_threads=2)


def test_503_is_retried_as_retry_after_says_then_raised(tight_server: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    """Two images never fit a one-image queue: every attempt is a real 503 queue_full with Retry-After."""
    before = metric(tight_server, 'tlserve_rejections_total{reason="queue_full"}')
    with (
        caplog.at_level(logging.INFO, logger="tlserve.client"),
        Client(tight_server.url, retries=2) as c,
        pytest.raises(ClientError) as err,
    ):
        c.classify([PNG_RED, JPEG_BLUE])
    assert (err.value.status, err.value.code) == (503, "queue_full")
    assert metric(tight_server, 'tlserve_rejections_total{reason="queue_full"}') - before == 3  # 1 try + 2 retries
    waits = [float(m.group(1)) for r in caplog.records if (m := re.search(r"retry \d/2 in ([\d.]+)s", r.getMessage()))]
    assert waits == [1.0, 1.0]  # the server's Retry-After, not the client's own backoff (0.5, 1.0)


def test_retry_turns_503s_into_successes(tight_server: ServerProcess) -> None:
    """Concurrent single images against a one-image queue: some get 503 at first; every one ends classified."""
    key = 'tlserve_rejections_total{reason="queue_full"}'

    async def wave(ac: AsyncClient) -> list:
        return await asyncio.gather(*(ac.classify(PNG_RED if i % 2 else JPEG_BLUE) for i in range(24)))

    async def run() -> tuple[float, list]:
        before = metric(tight_server, key)
        results: list = []
        async with AsyncClient(tight_server.url, retries=40, max_wait=0.2) as ac:
            for _ in range(5):  # until the queue really overflowed at least once
                results += await wave(ac)
                if metric(tight_server, key) > before:
                    break
        return metric(tight_server, key) - before, results

    rejected, results = asyncio.run(run())
    assert rejected > 0, "no request was ever refused: the retry path was not exercised"
    assert all(r.results[0].label in ("red", "blue") and r.results[0].error is None for r in results)
