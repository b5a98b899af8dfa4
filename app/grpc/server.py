"""The gRPC front's server: ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on one port,
in the event loop of the HTTP front, over the same :class:`~app.serving.service.Service`.

Life cycle (driven by :mod:`app.server`): :meth:`GrpcFront.bind` claims the port before the model
loads (a port in use fails start-up at once); :meth:`start` serves once the service has started;
:meth:`begin_drain` (SIGTERM) turns health NOT_SERVING while RPCs are still served;
:meth:`close` stops accepting, when HTTP closes its listener; :meth:`stop` waits (up to
``drain_timeout_s``) until every RPC accepted has been answered, before the batch queue drains.

Messages are capped at ``max_body_bytes`` (gRPC answers RESOURCE_EXHAUSTED beyond it). Compressed
messages are refused by gRPC itself (UNIMPLEMENTED, before any byte is inflated) unless
``grpc_compression`` is on; then gzip and deflate are accepted and the cap applies to the inflated
message (gRPC's decompression filter refuses a larger one with RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app.core.settings import Settings
from app.grpc.interceptors import RequestInterceptor
from app.grpc.servicers import InferenceServicer
from app.grpc.stubs import SERVICE, pb_grpc
from app.serving.service import Service

log = logging.getLogger(__name__)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcBindError(RuntimeError):
    pass


class GrpcFront:
    def __init__(self, service: Service, settings: Settings, host: str) -> None:
        self.service = service
        self.settings = settings
        self.address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None

    def bind(self) -> None:
        """Create the server and claim the port (in the running event loop)."""
        options = [
            ("grpc.max_receive_message_length", self.settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
            # bit 0 identity, 1 deflate, 2 gzip: a message compressed with a disabled algorithm is refused by gRPC
            ("grpc.compression_enabled_algorithms_bitset", 0b111 if self.settings.grpc_compression else 0b001),
        ]
        server = grpc.aio.server(interceptors=[RequestInterceptor(self.settings, self.service.metrics)], options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.service), server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise GrpcBindError(f"gRPC front cannot listen on {self.address} (grpc_port): {exc}") from None
        if port == 0:
            raise GrpcBindError(
                f"gRPC front cannot listen on {self.address} (grpc_port): the port is in use or the address is invalid"
            )
        self.server = server

    async def start(self) -> None:
        assert self.server is not None, "bind() first"
        await self.server.start()
        await self._set_health()
        log.info("gRPC front listening on %s (%s, grpc.health.v1)", self.address, SERVICE)

    async def _set_health(self) -> None:
        status = SERVING if self.service.ready[0] else NOT_SERVING
        for name in ("", SERVICE):  # "" is the whole server (Kubernetes grpc probes ask for it)
            await self.health.set(name, status)

    def begin_drain(self) -> None:
        """SIGTERM: health NOT_SERVING at once; RPCs are still accepted until :meth:`close`."""
        asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())

    def close(self) -> None:
        """Stop accepting RPCs (new ones get UNAVAILABLE); accepted ones go on for up to ``drain_timeout_s``."""
        if self.server is not None and self._stopping is None:
            log.info("gRPC front: closing the listener; waiting up to %.0fs for RPCs in flight", self.settings.drain_timeout_s)
            self._stopping = asyncio.get_running_loop().create_task(self.server.stop(self.settings.drain_timeout_s))

    async def stop(self) -> None:
        """Close (if not yet) and wait until every accepted RPC has been answered."""
        self.close()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
