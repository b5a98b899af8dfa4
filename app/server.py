"""``tlserve serve``: uvicorn (HTTP) and, with ``grpc_port``, the gRPC front, with a drain-first shutdown.

Both fronts share one event loop and one :class:`~app.serving.service.Service` (one batcher, one set of
metrics). Start-up: the gRPC port is claimed first (a port in use fails at once, before the model
loads), the service starts (the app's lifespan), then both fronts serve.

On SIGTERM/SIGINT: ``/readyz``, ``/v2/health/ready``, ``ServerReady`` and the gRPC health service turn
not-ready at once (load balancers stop routing), both listeners stay open for ``shutdown_delay_s`` so
requests already routed here are still accepted, then both stop accepting at the same moment; uvicorn
waits for in-flight HTTP requests and gRPC for in-flight RPCs (each bounded by ``drain_timeout_s``),
and only then does the lifespan shutdown drain the batch queue. Nothing accepted is dropped. A second
signal skips the delay.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import tracing
from app.core.settings import get_settings
from app.main import create_app
from app.serving.service import Service

if TYPE_CHECKING:
    from app.grpc.server import GrpcFront

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, delay_s: float, front: GrpcFront | None = None) -> None:
        super().__init__(config)
        self.service = service
        self.delay_s = delay_s
        self.front = front

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.service.draining
        self.service.begin_drain()
        if first and self.front is not None:
            self.front.begin_drain()
        if not first or self.delay_s <= 0:
            super().handle_exit(sig, frame)
            return
        log.info("%s: not ready; closing the listeners in %.1fs", signal.Signals(sig).name, self.delay_s)
        asyncio.get_running_loop().call_later(self.delay_s, super().handle_exit, sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.front is not None:
            self.front.close()  # the gRPC listener closes with the HTTP one
        await super().shutdown(sockets)
        tracing.shutdown()  # the last spans, before uvicorn re-raises the signal that stopped it


def with_grpc(app: ASGIApp, front: GrpcFront) -> ASGIApp:
    """``app`` whose lifespan also runs the gRPC front: bind before the service starts, serve once it
    has, and answer every accepted RPC before the service shuts down (and drains the batch queue)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await front.stop()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await front.start()
            await send(message)

        from app.grpc.server import GrpcBindError

        try:
            front.bind()
        except GrpcBindError as exc:
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await app(scope, lifespan_receive, lifespan_send)

    return wrapped


def serve(host: str | None = None, port: int | None = None, *, generate_admin_key: bool = False) -> int:
    """Serve on ``host``/``port`` (default: the settings'). ``generate_admin_key`` (``make run``): with no
    ``TLSERVE_ADMIN_KEYS`` set, make one for this run and print it, as Jupyter prints its token."""
    settings = get_settings()
    host = host or settings.host
    port = port if port is not None else settings.port
    update: dict[str, object] = {"host": host, "port": port}
    if generate_admin_key and not settings.admin_key_list:
        update["admin_keys"] = secrets.token_urlsafe(24)
        shown = f"[{host}]" if ":" in host else host
        print(f"\n    admin key for this run (train, promote, roll back, delete; the console asks for it):\n\n"
              f"        {update['admin_keys']}\n\n    console: http://{shown}:{port}/ui/   "
              "(set TLSERVE_ADMIN_KEYS to keep a key of your own)\n", file=sys.stderr, flush=True)  # fmt: skip
    settings = settings.model_copy(update=update)
    try:
        settings.check_ports()  # model_copy does not validate again
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        tracing.configure()
        if settings.grpc_port:
            from app.grpc.server import GrpcFront  # grpcio is imported only when the gRPC front is on
    except (tracing.TracingConfigError, ImportError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    app = create_app(settings)
    service: Service = app.state.service
    front = GrpcFront(service, settings, host) if settings.grpc_port else None
    config = uvicorn.Config(
        with_grpc(app, front) if front else app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=5,
        lifespan="on",
        server_header=False,
    )
    server = DrainingServer(config, service, settings.shutdown_delay_s, front)
    try:
        server.run()
    finally:
        tracing.shutdown()
    return 0 if server.started else 1
