"""OpenTelemetry traces: off unless an OTLP endpoint is configured, and free when off.

On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and
``OTEL_SDK_DISABLED`` is not ``true``); everything else is the standard ``OTEL_*`` variables, read by the
SDK itself: ``OTEL_SERVICE_NAME`` (default ``tlserve``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``/``_ARG`` (default ``parentbased_always_on``), ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``
(``http/protobuf`` by default, or ``grpc``), headers, timeouts and ``OTEL_BSP_*`` batching. Off, this
module never imports OpenTelemetry and every hook below is one flag test.

One trace per request, continued from an incoming W3C ``traceparent``::

    POST /v2/models/{name}/infer   (or inference.GRPCInferenceService/ModelInfer)   the front's server span
    ├── receive        read and parse the request
    ├── decode         one per image (decode thread)
    ├── queue wait     submit → the batch starts, one per batch piece
    ├── inference      this request's part in a batch run; links to the batch span
    ├── head           logistic regression
    └── encode         the response
    batch              one per ONNX Runtime run, its own trace, linked to every request it served;
                       attributes: batch size, requests, provider, precision

Responses carry ``traceparent`` (HTTP header, gRPC initial metadata) and log lines a ``trace_id``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from app import __version__

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_SERVICE_NAME = "tlserve"
INSTALL_HINT = "pip install 'tlserve[tracing]'"

enabled = False
"""True once :func:`configure` has set up the SDK; every hook checks it first."""
_tracer: Any = None
_provider: Any = None
_NOOP = contextlib.nullcontext()
F = TypeVar("F", bound=Callable[..., Any])


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something tlserve cannot do (unknown protocol, SDK not installed)."""


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint is set and the SDK is not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(v, "").strip() for v in ENDPOINT_VARS)


def protocol(environ: Mapping[str, str] = os.environ) -> str:
    value = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or PROTOCOLS[0]
    ).strip()
    if value not in PROTOCOLS:
        raise TracingConfigError(f"OTLP protocol {value!r} is not supported for traces: use {' or '.join(PROTOCOLS)}")
    return value


def configure(environ: Mapping[str, str] = os.environ) -> bool:
    """Set up the SDK when the environment asks for traces; True if tracing is on. Call once, at start-up."""
    global enabled, _tracer, _provider
    if enabled or not wanted(environ):
        return enabled
    proto = protocol(environ)
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if proto == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        extra = " and opentelemetry-exporter-otlp-proto-grpc" if proto == "grpc" else ""
        raise TracingConfigError(
            f"{' or '.join(v for v in ENDPOINT_VARS if environ.get(v))} is set but OpenTelemetry is not installed "
            f"({exc.name}): {INSTALL_HINT}{extra}"
        ) from None
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    _provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint, headers from OTEL_*
    trace.set_tracer_provider(_provider)
    _tracer = trace.get_tracer("tlserve", __version__)
    enabled = True
    log.info("tracing on: OTLP %s, service %s", proto, resource.attributes.get(SERVICE_NAME))
    return True


def shutdown() -> None:
    """Flush and stop the exporter, once (when the server has drained)."""
    global enabled, _provider
    enabled = False
    if _provider is not None:
        provider, _provider = _provider, None
        provider.shutdown()


# --- hooks (each one flag test when off) ---------------------------------------------------------
def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one, made current for the block; a no-op when tracing is off."""
    if not enabled:
        return _NOOP
    span: contextlib.AbstractContextManager[Any] = _tracer.start_as_current_span(name, attributes=attributes)
    return span


@contextlib.contextmanager
def _server_span(name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> Iterator[Any]:
    from opentelemetry import propagate, trace

    parent = propagate.extract(carrier)
    with _tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes) as s:
        yield s


def server_span(name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """A front's span for one request, continuing the trace of an incoming ``traceparent`` in ``carrier``."""
    if not enabled:
        return _NOOP
    return _server_span(name, carrier, attributes)


def set_error(span: Any, description: str) -> None:
    """Mark a span failed (a server-side error: HTTP 5xx, or a gRPC code that is the server's fault)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))


def traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (for the response), or None."""
    if not enabled:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def trace_id() -> str | None:
    """The current trace id in hex (for log lines), or None: also when the trace is not sampled, since
    no trace would be found under that id."""
    if not enabled:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid and ctx.trace_flags.sampled else None


def capture() -> Any:
    """The current trace context, to parent spans made later elsewhere (the batcher); None when off."""
    if not enabled:
        return None
    from opentelemetry import context

    return context.get_current()


def bind(fn: F) -> F:
    """``fn`` running in (a copy of) the caller's trace context, for thread pools (``run_in_executor``
    drops it). One call of the result per ``bind``: a context cannot be entered by two threads at once."""
    if not enabled:
        return fn
    ctx = contextvars.copy_context()
    return lambda *args: ctx.run(fn, *args)  # type: ignore[return-value]


def batch(
    pieces: Sequence[tuple[Any, float, int]],
    started: float,
    size: int,
    attributes: Mapping[str, Any],
    error: BaseException | None = None,
) -> None:
    """Spans for one batch run that has just ended: its own ``batch`` span linked to every request it
    served, and in each request's trace a ``queue wait`` and an ``inference`` span (linked back).

    ``pieces``: ``(trace context from capture(), perf_counter when queued, images)`` for each piece;
    ``started``: perf_counter when the run began.
    """
    if not enabled:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Link, Status, StatusCode

    now_perf, now_ns = time.perf_counter(), time.time_ns()

    def ns(t: float) -> int:
        return now_ns - int((now_perf - t) * 1e9)

    start_ns = ns(started)
    parents = [trace.get_current_span(ctx).get_span_context() for ctx, _, _ in pieces if ctx is not None]
    attrs = {"tlserve.batch.size": size, "tlserve.batch.requests": len(pieces), **attributes}
    run = _tracer.start_span("batch", context=trace.set_span_in_context(trace.INVALID_SPAN), links=[Link(p) for p in parents if p.is_valid],
                             attributes=attrs, start_time=start_ns)  # fmt: skip
    if error is not None:
        run.set_status(Status(StatusCode.ERROR, type(error).__name__))
    run.end(end_time=now_ns)
    link = [Link(run.get_span_context())]
    for ctx, queued_at, images in pieces:
        if ctx is None:
            continue
        _tracer.start_span("queue wait", context=ctx, attributes={"tlserve.images": images}, start_time=ns(queued_at)).end(
            end_time=start_ns
        )
        own = _tracer.start_span(
            "inference", context=ctx, links=link, attributes={**attrs, "tlserve.images": images}, start_time=start_ns
        )
        if error is not None:
            own.set_status(Status(StatusCode.ERROR, type(error).__name__))
        own.end(end_time=now_ns)
