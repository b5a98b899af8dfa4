"""Dependency aliases: the service and API-key auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import Unauthorized
from app.service import Service


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_key(request: Request) -> None:
    """Constant-time check of ``Authorization: Bearer KEY`` or ``X-API-Key`` when keys are configured."""
    keys: tuple[str, ...] = request.app.state.service.settings.keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    ok = False
    for key in keys:  # compare against every key so timing does not reveal which one matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise Unauthorized("missing or invalid API key (send Authorization: Bearer KEY or X-API-Key)")


async def probe_auth(request: Request) -> None:
    if not request.app.state.service.settings.open_probes:
        await require_key(request)
