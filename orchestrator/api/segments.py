"""``GET /v1/segments/{segment}/recommendations``: the popular list of an anonymous segment, cacheable
(ETag, Cache-Control). Only FastAPI serves it, so its declarations are its one parser."""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import ORJSONResponse, Response
from pydantic import BaseModel

from orchestrator import metrics, schema
from orchestrator.api.recommendations import DEFAULT_N, MAX_N
from orchestrator.api.shared import Problem, ScoredItem, services_of

PATH = "/v1/segments/{segment}/recommendations"
SEGMENT_PATTERN = r"^[a-z0-9]+$"
SEGMENT_MAX_LENGTH = 32


class SegmentResponse(BaseModel):
    segment: str
    items: list[ScoredItem]
    source: Literal["popular"]
    model_version: str


router = APIRouter(default_response_class=ORJSONResponse)


@router.get(
    PATH,
    response_model=None,
    responses={
        200: {"model": SegmentResponse},
        304: {"description": "Not modified (If-None-Match)"},
        404: {"model": Problem},
    },
)
async def segment_recommendations(
    request: Request,
    segment: Annotated[str, Path(min_length=1, max_length=SEGMENT_MAX_LENGTH, pattern=SEGMENT_PATTERN)],
    n: Annotated[int, Query(ge=1, le=MAX_N)] = DEFAULT_N,
) -> Response:
    started = time.perf_counter()
    services = services_of(request.app)
    if segment not in schema.SEGMENTS:
        return ORJSONResponse(
            {"detail": f"unknown segment {segment!r}; expected one of {list(schema.SEGMENTS)}"}, status_code=404
        )
    try:
        recs = services.popular.get(segment)
    except LookupError as exc:
        return ORJSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
    items = list(zip(recs.items[:n], recs.scores[:n], strict=True))
    digest = hashlib.sha256(repr((segment, recs.model_version, recs.computed_at, items)).encode()).hexdigest()[:20]
    etag = f'"{digest}"'
    headers = {"ETag": etag, "Cache-Control": f"public, max-age={services.settings.popular.segment_max_age_s}"}
    metrics.REQUEST_LATENCY.labels("segments", "popular").observe(time.perf_counter() - started)
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    body = {
        "segment": segment,
        "items": [{"item_id": item, "score": score} for item, score in items],
        "source": "popular",
        "model_version": recs.model_version,
    }
    return ORJSONResponse(body, headers=headers)
