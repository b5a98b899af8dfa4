"""Dependency aliases: the service and API-key auth."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request

from app.core.errors import AdminDisabled, Forbidden, ServeOnly, StoreUnavailable, Unauthorized
from app.core.keys import given_key, key_matches
from app.serving.service import Service


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_key(request: Request) -> None:
    """Constant-time check of ``Authorization: Bearer KEY`` or ``X-API-Key`` when API keys are configured
    (``TLSERVE_API_KEYS``; an admin key also serves inference). Without API keys inference is open."""
    settings = request.app.state.service.settings
    if not settings.keys:
        return
    if not key_matches(given_key(request.headers), settings.inference_keys):
        raise Unauthorized("missing or invalid API key (send Authorization: Bearer KEY or X-API-Key)")


async def require_admin(request: Request) -> None:
    """Admin operations (train, examples, reload, promote, roll back, delete) need an admin key, always: with no
    admin key set they are refused (403 ``admin_disabled``), on loopback too, since any web page the operator
    visits can send a simple cross-site POST to a local server."""
    settings = request.app.state.service.settings
    if not settings.admin_key_list:
        raise AdminDisabled(
            "admin operations are off: no admin key is set; set TLSERVE_ADMIN_KEYS (or run `make run`, which "
            "makes one for this run and prints it) and send it as Authorization: Bearer KEY or X-API-Key"
        )
    given = given_key(request.headers)
    if key_matches(given, settings.admin_key_list):
        return
    if settings.keys and key_matches(given, settings.keys):
        raise Forbidden("this operation needs an admin key (TLSERVE_ADMIN_KEYS); an inference key is not enough")
    raise Unauthorized("missing or invalid admin key (send Authorization: Bearer KEY or X-API-Key; TLSERVE_ADMIN_KEYS)")


async def require_writer(request: Request) -> None:
    """Operations that write the head store (train, examples, promote, roll back, delete) run on trainers:
    a ``role=serve`` replica refuses them (403 ``serve_only``), so it needs neither the signing key nor write
    credentials. Reload writes nothing and stays on every replica. While the head store was last found
    unreachable (and one more look finds it so) they are refused (503 ``store_unavailable`` + Retry-After)
    before a body is read or a job starts: nothing is accepted that could not be committed."""
    service = request.app.state.service
    if service.settings.role == "serve":
        raise ServeOnly(
            "this replica has TLSERVE_ROLE=serve: it serves heads and writes none; send train, examples, promote, "
            "rollback and delete to a trainer (TLSERVE_ROLE=train or both)"
        )
    heads = service.store.heads
    if heads.stale_since is not None and not await asyncio.to_thread(heads.refresh):  # one fresh look: polling may be off
        assert heads.stale_since is not None
        since = datetime.fromtimestamp(heads.stale_since, UTC).isoformat(timespec="seconds")
        raise StoreUnavailable(f"the head store has been unreachable since {since}; nothing was written, retry later")


async def probe_auth(request: Request) -> None:
    if not request.app.state.service.settings.open_probes:
        await require_key(request)
