"""Our error tree (:mod:`app.core.errors`) as gRPC status codes: one table, looked up along each error's class tree.

    InputError (4xx)                 INVALID_ARGUMENT   bad image, bad tensor, over a per-request limit
    ├── Unauthorized         401     UNAUTHENTICATED
    ├── Forbidden            403     PERMISSION_DENIED
    ├── OutputConflict       409     FAILED_PRECONDITION (batch outputs; no RPC raises it)
    └── ClientDisconnected   499     CANCELLED
    NotFound (404)                   NOT_FOUND          unknown head, unknown version
    CapacityError (503)
    ├── QueueFull                    RESOURCE_EXHAUSTED with a retry hint (see below)
    └── ShuttingDown                 UNAVAILABLE        draining: retry on another replica
    ModelError (500)                 INTERNAL
    ├── IncompatibleHead, UntrustedHead, VersionConflict (409)   FAILED_PRECONDITION
    └── NotReady             503     UNAVAILABLE
    anything else                    INTERNAL           "internal error"; the details go to the log

Over-limit requests (``max_images_per_request``) are INVALID_ARGUMENT, as Triton answers an
over-size batch; a message over the size limit (``max_body_bytes``) is refused by gRPC itself with
RESOURCE_EXHAUSTED before any handler runs. Every refusal carries its stable tlserve code in the
``tlserve-error-code`` trailing metadata; a capacity error also carries ``retry-after`` (seconds, as
HTTP's header) and ``grpc-retry-pushback-ms``, which gRPC clients with a retry policy obey.
"""

from __future__ import annotations

import grpc

from app.core.errors import (
    CapacityError,
    ClientDisconnected,
    Forbidden,
    IncompatibleFeatures,
    IncompatibleHead,
    InputError,
    ModelError,
    NotFound,
    NotReady,
    OutputConflict,
    QueueFull,
    ShuttingDown,
    TlserveError,
    TooManyJobs,
    Unauthorized,
    UntrustedHead,
    VersionConflict,
)

CODES: dict[type[TlserveError], grpc.StatusCode] = {
    TlserveError: grpc.StatusCode.INTERNAL,
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    ClientDisconnected: grpc.StatusCode.CANCELLED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    CapacityError: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyJobs: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    ModelError: grpc.StatusCode.INTERNAL,
    IncompatibleHead: grpc.StatusCode.FAILED_PRECONDITION,
    IncompatibleFeatures: grpc.StatusCode.FAILED_PRECONDITION,
    UntrustedHead: grpc.StatusCode.FAILED_PRECONDITION,
    VersionConflict: grpc.StatusCode.FAILED_PRECONDITION,
    OutputConflict: grpc.StatusCode.FAILED_PRECONDITION,
    NotReady: grpc.StatusCode.UNAVAILABLE,
}
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN})
"""Codes that are the server's fault (the span is marked failed), not the caller's."""
ERROR_CODE_KEY = "tlserve-error-code"


def code_for(exc: TlserveError) -> grpc.StatusCode:
    """The status of the closest class of ``exc`` in :data:`CODES`."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def trailing_metadata(exc: TlserveError) -> tuple[tuple[str, str], ...]:
    out: tuple[tuple[str, str], ...] = ((ERROR_CODE_KEY, exc.code),)
    if isinstance(exc, CapacityError):
        out += (("retry-after", str(exc.retry_after_s)), ("grpc-retry-pushback-ms", str(exc.retry_after_s * 1000)))
    return out
