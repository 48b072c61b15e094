"""OpenTelemetry traces, off by default (``RECSERVE_TELEMETRY_OTLP_ENDPOINT`` turns them on).

``span(name)`` is what the request path calls: while tracing is off it returns one shared no-op context
manager (a global read and a call: the hot path pays nothing else), and the OpenTelemetry packages are
never imported. They are the ``telemetry`` extra (``pip install .[telemetry]``), imported by ``start`` only.

The tracer provider is this module's own, never the process-global one: FastAPI's native telemetry follows
the global providers, so it stays off, and the request span here (``orchestrator/request_id.py``) covers the
hot route and FastAPI's routes alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.errors import TelemetryUnavailable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from orchestrator.config import TelemetrySettings

NOOP: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Tracer | None = None

# The recommender's stages (orchestrator/recommender.py, StageTimer) by the dependency each one waits on.
STAGE_SPANS = {
    "cache": "cache.lookup",
    "user_features": "redis.user_features",
    "retrieval": "faiss.search",
    "item_features": "redis.item_features",
    "ranking": "rank",
}


def enabled() -> bool:
    return _tracer is not None


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one while tracing is on; a shared no-op otherwise."""
    tracer = _tracer
    if tracer is None:
        return NOOP
    return tracer.start_as_current_span(name, attributes=attributes)


def stage_span(stage: str) -> contextlib.AbstractContextManager[Any]:
    tracer = _tracer
    if tracer is None:
        return NOOP
    return tracer.start_as_current_span(STAGE_SPANS.get(stage, stage))


def request_span(
    name: str, headers: list[tuple[bytes, bytes]], request_id: str
) -> contextlib.AbstractContextManager[Any]:
    """The server span of one request, a child of the caller's trace when it sent a W3C ``traceparent``."""
    tracer = _tracer
    if tracer is None:
        return NOOP
    from opentelemetry import propagate, trace

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}
    context = propagate.extract(carrier) if carrier else None
    return tracer.start_as_current_span(
        name, context=context, kind=trace.SpanKind.SERVER, attributes={"recserve.request_id": request_id}
    )


def current_trace_id() -> str | None:
    """The trace id of the current span (hex), for log lines; None while tracing is off or outside a span."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def start(settings: TelemetrySettings, exporter: SpanExporter | None = None) -> Callable[[], None] | None:
    """Tracing on when ``settings.otlp_endpoint`` is set (spans batched to the OTLP/gRPC exporter; ``exporter``
    replaces it, sent span by span: the tests' in-memory one). Returns the shutdown (flushes what is left), or
    None when tracing stays off. Called in the lifespan, at start."""
    global _tracer
    if not settings.otlp_endpoint and exporter is None:
        return None
    endpoint = settings.otlp_endpoint or "(an injected exporter)"
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TelemetryUnavailable(endpoint, exc.name or "opentelemetry-sdk") from exc
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(1 / settings.sample_one_in)),
    )
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TelemetryUnavailable(endpoint, exc.name or "opentelemetry-exporter-otlp-proto-grpc") from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Our own provider, not the process-global one: a second start (tests) replaces it cleanly.
    _tracer = provider.get_tracer("recserve.orchestrator")

    def shutdown() -> None:
        global _tracer
        _tracer = None
        provider.shutdown()

    return shutdown
