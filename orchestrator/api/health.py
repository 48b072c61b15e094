"""``/healthz`` (the process is alive), ``/readyz`` (it can answer, and what is degraded) and ``/metrics``
(Prometheus)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator import metrics
from orchestrator.api.shared import services_of
from orchestrator.guards import AdmissionLoad

# /metrics is rendered at most once per this interval (Prometheus scrapes every 15-30 s): a scrape flood
# costs a bytes copy per scrape, not a render of every metric on the event loop.
METRICS_INTERVAL_S = 1.0


class RenderedMetrics:
    """The exposition bytes, rendered again only once ``interval_s`` has passed since the last render."""

    def __init__(
        self,
        interval_s: float = METRICS_INTERVAL_S,
        render: Callable[[], bytes] = generate_latest,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.render = render
        self.clock = clock
        self.renders = 0
        self._body = b""
        self._rendered_at: float | None = None

    def get(self) -> bytes:
        now = self.clock()
        if self._rendered_at is None or now - self._rendered_at >= self.interval_s:
            metrics.METRICS_RENDERS.inc()  # before the render: the bytes count themselves
            self.renders += 1
            self._body = self.render()
            self._rendered_at = now
        return self._body


RENDERED = RenderedMetrics()  # one per process, as the registry it renders is

router = APIRouter(default_response_class=ORJSONResponse)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", response_model=None, responses={503: {"description": "Cannot serve at all"}})
async def readyz(request: Request) -> ORJSONResponse:
    """Ready while it can answer at all (popular lists in memory, index loaded) and is not refusing every
    request (admission full for a sustained window); says what is degraded."""
    admission: AdmissionLoad | None = getattr(request.app.state, "admission", None)
    if admission is not None and admission.shedding_everything():
        # Alive, but refusing every request: the load balancer should send elsewhere until it catches up.
        detail = (
            f"every request refused for {admission.window_s:g} s "
            f"({admission.in_flight} in flight, limit {admission.max_in_flight})"
        )
        return ORJSONResponse({"status": "shedding", "detail": detail}, status_code=503)
    services = services_of(request.app)
    readiness = await services.readiness()
    components = {name: part.state for name, part in readiness.items()}
    degraded = sorted(name for name, part in readiness.items() if not part.ok)
    can_serve = readiness["popular"].ok
    body = {
        "status": ("degraded" if degraded else "ready") if can_serve else "unavailable",
        "degraded": degraded,
        "components": components,
        "model_version": services.ranker.model_version,
    }
    return ORJSONResponse(body, status_code=200 if can_serve else 503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(RENDERED.get(), media_type=CONTENT_TYPE_LATEST)
