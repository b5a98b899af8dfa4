"""Per-request context as a plain ASGI middleware: request id, trace span, in-flight gauge, metrics, one JSON log line."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import tracing
from app.core.logs import request_id
from app.serving.metrics import Metrics

log = logging.getLogger("tlserve.access")
QUIET = frozenset({"/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500
        started = time.perf_counter()
        trace_id: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if (parent := tracing.traceparent()) is not None:
                    extra.append((b"traceparent", parent.encode()))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if not tracing.enabled:
                await self.app(scope, receive, send_with_id)
            else:
                carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
                attributes = {"http.request.method": scope["method"], "url.path": scope["path"], "tlserve.request_id": rid}
                with tracing.server_span(f"{scope['method']} {scope['path']}", carrier, attributes) as span:
                    trace_id = tracing.trace_id()
                    try:
                        await self.app(scope, receive, send_with_id)
                    finally:
                        route = getattr(scope.get("route"), "path", None)
                        if route:
                            span.update_name(f"{scope['method']} {route}")
                            span.set_attribute("http.route", route)
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            tracing.set_error(span, str(status))
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_duration.labels(route, scope["method"], str(status)).observe(elapsed)
            if scope["path"] not in QUIET or status >= 400:
                extra = {"request_id": rid, "route": route, "status": status, "duration_ms": round(elapsed * 1000, 2),
                         "images": state.get("images", 0), "head": state.get("head")}  # fmt: skip
                if trace_id:
                    extra["trace_id"] = trace_id
                log.info("%s %s %d", scope["method"], scope["path"], status, extra=extra)


class TrustedHosts:
    """Refuse HTTP requests whose ``Host`` is not one of ``hosts`` (400 ``host_not_allowed``, JSON), as Starlette's
    ``TrustedHostMiddleware`` does but in the service's error shape: a DNS-rebinding page reaches a loopback server
    under its own name and is refused before any route runs. ``*`` allows any host, ``*.example.com`` subdomains."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in hosts
        self.exact = frozenset(h for h in hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))

    def allowed(self, header: str) -> bool:
        host = header.strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1 : host.find("]")] if "]" in host else host
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return host in self.exact or any(host.endswith(s) for s in self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.allowed(header):
            await self.app(scope, receive, send)
            return
        rid = scope.get("state", {}).get("request_id")
        message = (f"Host {header!r} is not one this server answers to (allowed: {', '.join(sorted(self.exact | {'*' + s for s in self.suffixes}))}); "
                   "set TLSERVE_ALLOWED_HOSTS to the names clients use")  # fmt: skip
        body = json.dumps({"error": {"code": "host_not_allowed", "message": message, "request_id": rid}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
