"""API keys as every front reads them: ``Authorization: Bearer KEY`` or ``X-API-Key`` (HTTP headers, gRPC
metadata), compared in constant time against every configured key."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def given_key(headers: Mapping[str, str]) -> str:
    """The key a request sends (``headers``: HTTP headers, or gRPC metadata with lower-case keys)."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    ok = False
    for key in keys:  # compare against every key so timing does not reveal which one matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok
