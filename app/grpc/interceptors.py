"""What every RPC gets, as HTTP's middleware gives every request: request id, trace span, API key,
errors as statuses, in-flight gauge, duration metric, one JSON log line.

- request id: the client's ``x-request-id`` metadata when sane, else a new one; sent back in the
  initial metadata with ``traceparent`` (tracing on);
- API keys: ``authorization: Bearer KEY`` or ``x-api-key`` metadata, the same keys as HTTP (an
  admin key serves inference too; every RPC here is inference or metadata, none is an admin one); with
  ``open_probes`` the health RPCs (``ServerLive``, ``ServerReady``, ``grpc.health.v1.Health``) stay open.
  The key is checked from the call's metadata **before the message is read**: a refused unary call
  is answered by a handler that never asks for its message (gRPC copies none of its bytes into Python,
  protobuf parses none), a refused health ``Watch`` by a deserializer that parses nothing;
- bounds before parsing: an accepted call's message is walked on the wire (:mod:`app.grpc.wire`) and
  refused beyond ``max_request_elements`` fields and packed numbers (INVALID_ARGUMENT,
  ``request_too_complex``) before protobuf builds one object;
- an :mod:`app.core.errors` exception becomes the status of :func:`app.grpc.status.code_for`, its message
  (without model store paths) the details, and its code and retry hint the trailing metadata;
  anything else is INTERNAL "internal error" and a traceback in the log;
- ``tlserve_request_duration_seconds{route="/inference.GRPCInferenceService/ModelInfer", method="GRPC",
  status="OK"}`` and ``tlserve_in_flight_requests`` count RPCs beside HTTP requests (images are
  counted once, by the service, whatever the front).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor

from app.core import tracing
from app.core.errors import TlserveError, Unauthorized, redact
from app.core.keys import given_key, key_matches
from app.core.logs import request_id
from app.core.settings import Settings
from app.grpc.status import SERVER_FAULTS, code_for, trailing_metadata
from app.grpc.wire import check_message
from app.serving.metrics import Metrics

log = logging.getLogger("tlserve.access")
INFERENCE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
PROBES = frozenset({f"/{INFERENCE}/ServerLive", f"/{INFERENCE}/ServerReady", f"/{HEALTH}/Check", f"/{HEALTH}/Watch"})
UNAUTHORIZED = "missing or invalid API key (send metadata authorization: Bearer KEY, or x-api-key)"

_call: ContextVar[dict[str, Any]] = ContextVar("tlserve_grpc_call")


def note(**fields: Any) -> None:
    """Record fields (``images``, ``head``) for the RPC's log line, from inside a servicer."""
    with contextlib.suppress(LookupError):
        _call.get().update(fields)


class Refused:
    """What a request deserializer hands the handler instead of a message it did not parse."""

    def __init__(self, error: TlserveError) -> None:
        self.error = error


def _unparsed(raw: bytes) -> Refused:
    return Refused(Unauthorized(UNAUTHORIZED))


def _input_type(method: str) -> Descriptor | None:
    """The request message of ``/package.Service/Method``, from the protobuf descriptors the server registered."""
    try:
        service, name = method.lstrip("/").rsplit("/", 1)
        found: Descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name).input_type
    except (KeyError, ValueError, AttributeError):
        return None
    return found


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.keys = settings.inference_keys  # as over HTTP: none without API keys; an admin key also serves inference
        self.open = PROBES if settings.open_probes else frozenset()
        self.store_root = settings.model_store
        self.metrics = metrics
        self.max_elements = settings.max_request_elements

    def _deserializer(self, method: str, authorized: bool, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        """Without a valid key, nothing is parsed; with one, the bytes are bounded before ``parse`` runs."""
        if not authorized:
            return _unparsed
        descriptor = _input_type(method)
        limit, what = self.max_elements, f"the {method.rsplit('/', 1)[-1]} message"

        def bounded(raw: bytes) -> Any:
            if descriptor is not None:
                try:
                    check_message(raw, descriptor, limit, what)
                except TlserveError as exc:
                    return Refused(exc)
            return parse(raw) if parse is not None else raw

        return bounded

    def _check_key(self, metadata: dict[str, str]) -> None:
        if not key_matches(given_key(metadata), self.keys):  # HTTP's constant-time check
            raise Unauthorized(UNAUTHORIZED)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method: str = details.method
        metadata = {m.key: m.value for m in details.invocation_metadata or () if isinstance(m.value, str)}
        keyed = bool(self.keys) and method not in self.open
        authorized = True
        if keyed:
            try:
                self._check_key(metadata)  # from the metadata, before the message is parsed
            except Unauthorized:
                authorized = False
        deserializer = self._deserializer(method, authorized, handler.request_deserializer)
        if not authorized and handler.unary_unary is not None:
            # refused without reading the message at all: a handler that never asks for its request
            # (the wire is the same for a unary request), so gRPC does not even copy its bytes into Python
            async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._handle(method, metadata, None, Refused(Unauthorized(UNAUTHORIZED)), context)

            return grpc.stream_unary_rpc_method_handler(
                refuse, request_deserializer=_unparsed, response_serializer=handler.response_serializer
            )
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._handle(method, metadata, behavior, request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:  # health Watch
            stream_behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Refused):
                    await context.abort(code_for(request.error), request.error.message,
                                        trailing_metadata=trailing_metadata(request.error))  # fmt: skip
                result = stream_behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        return handler  # no other kind of RPC is served

    async def _handle(
        self, method: str, metadata: dict[str, str], behavior: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        rid = request_id(metadata.get("x-request-id", ""))
        state: dict[str, Any] = {"images": 0, "head": None}
        token = _call.set(state)
        code, trace_id = grpc.StatusCode.OK, None
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            attributes = {"rpc.system": "grpc", "rpc.service": method.rsplit("/", 2)[1], "rpc.method": method.rsplit("/", 1)[1],
                          "tlserve.request_id": rid}  # fmt: skip
            with tracing.server_span(method.lstrip("/"), metadata, attributes) as span:
                trace_id = tracing.trace_id()
                initial = [("x-request-id", rid)]
                if (parent := tracing.traceparent()) is not None:
                    initial.append(("traceparent", parent))
                await context.send_initial_metadata(initial)
                try:
                    if isinstance(request, Refused):  # no key, or over a bound: never parsed
                        raise request.error
                    return await behavior(request, context)
                except TlserveError as exc:
                    code = code_for(exc)
                    await context.abort(code, redact(exc.message, self.store_root), trailing_metadata=trailing_metadata(exc))
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN  # the behavior aborted by itself (health: NOT_FOUND)
                    raise
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED  # the client went away
                    raise
                except Exception as exc:
                    code = grpc.StatusCode.INTERNAL
                    log.error("unhandled error in %s: %s", method, type(exc).__name__, exc_info=exc, extra={"request_id": rid})
                    await context.abort(code, "internal error; see the server log with this request id")
                finally:
                    if span is not None:
                        span.set_attribute("rpc.grpc.status_code", code.value[0])
                        if code in SERVER_FAULTS:
                            tracing.set_error(span, code.name)
        finally:
            _call.reset(token)
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            self.metrics.request_duration.labels(method, "GRPC", code.name).observe(elapsed)
            if method not in PROBES or code != grpc.StatusCode.OK:
                extra = {"request_id": rid, "route": method, "status": code.name, "duration_ms": round(elapsed * 1000, 2),
                         "images": state["images"], "head": state["head"], "front": "grpc"}  # fmt: skip
                if trace_id:
                    extra["trace_id"] = trace_id
                log.info("GRPC %s %s", method, code.name, extra=extra)
