"""``/healthz`` (the process is alive), ``/readyz`` (it can answer, and what is degraded) and ``/metrics``
(Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.api.shared import services_of

router = APIRouter(default_response_class=ORJSONResponse)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", response_model=None, responses={503: {"description": "Cannot serve at all"}})
async def readyz(request: Request) -> ORJSONResponse:
    """Ready while it can answer at all (popular lists in memory, index loaded); says what is degraded."""
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
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
