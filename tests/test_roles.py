"""TLSERVE_ROLE: a ``serve`` replica answers requests and refuses every write with 403 ``serve_only``, and
holds no signing key; ``train`` and ``both`` (the default) write as before."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from app.core.settings import Settings
from app.core.signing import generate
from app.storage.store import ModelStore
from tests.helpers import ADMIN, ServerProcess, image_bytes

RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)


def test_a_serve_replica_refuses_every_write_and_serves(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(fresh_tiny_store, default_head="colors", role="serve")
    r = httpx.post(f"{server.url}/v1/classify", content=RED, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"
    writes = [
        ("POST", "/v1/heads/colors/train"),
        ("POST", "/v1/heads/colors/examples"),
        ("POST", "/v1/heads/colors/promote"),
        ("POST", "/v1/heads/colors/rollback"),
        ("DELETE", "/v1/heads/colors/versions/1"),
        ("DELETE", "/v1/heads/colors"),
    ]
    for method, path in writes:
        r = httpx.request(method, f"{server.url}{path}", headers=ADMIN, json={"version": 1})
        assert r.status_code == 403 and r.json()["error"]["code"] == "serve_only", (path, r.text)
        assert "TLSERVE_ROLE=serve" in r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/models/colors/reload", headers=ADMIN).status_code == 200  # writes nothing
    assert httpx.get(f"{server.url}/v1/heads/colors/versions").status_code == 200
    assert fresh_tiny_store.heads.versions("colors") == [1]


def test_the_admin_key_is_checked_before_the_role(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(fresh_tiny_store, default_head="colors", role="serve")
    r = httpx.post(f"{server.url}/v1/heads/colors/rollback")
    assert r.status_code == 401  # an anonymous caller learns nothing about the replica's role


def test_a_serve_replica_holds_no_signing_key() -> None:
    pem, _public = generate()
    with pytest.raises(ValidationError, match="role=serve holds no signing key"):
        Settings(role="serve", head_signing_key=pem.decode())
    assert Settings(role="train", head_signing_key=pem.decode()).role == "train"


def test_head_store_must_be_an_object_store_url() -> None:
    with pytest.raises(ValidationError, match="expected s3://bucket/prefix"):
        Settings(head_store="/srv/heads")
    assert Settings(head_store="s3://bucket/prefix").head_store == "s3://bucket/prefix"
