"""``GET /v1/recommendations/{user_id}``: its query spec, its one parser, its answer and its route.

``RecommendationQuery`` is the spec: ``parse`` validates a request with it, the FastAPI route declares its
OpenAPI parameters from its JSON schema, and the hot route (``orchestrator/hot_route.py``) calls the same
``parse`` and ``answer``. What one path accepts the other accepts, with the same values; a request that
``parse`` refuses gets FastAPI's 422, naming the field, whichever path it came in by.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator import metrics
from orchestrator.api.shared import ScoredItem, services_of
from orchestrator.ids import ID_MAX_LENGTH, ID_PATTERN
from orchestrator.recommender import Recommendation, Recommender, RequestContext
from orchestrator.routes import RECOMMENDATIONS_PATH, RECOMMENDATIONS_PREFIX

PATH = RECOMMENDATIONS_PATH
PREFIX = RECOMMENDATIONS_PREFIX
MAX_N = 100  # the API's bound on n (the list a cache entry holds has its own setting, ranking.list_length)
DEFAULT_N = 20
PageType = Literal["home", "product", "cart", "search", "category"]
Device = Literal["web", "ios", "android", "tv"]


class RecommendationQuery(BaseModel):
    """One request, valid: ``user_id`` from the path, the rest from the query string (others are ignored)."""

    model_config = ConfigDict(frozen=True)

    user_id: str = Field(
        min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description="User id: 1-64 of [A-Za-z0-9._:@-]"
    )
    n: int = Field(DEFAULT_N, ge=1, le=MAX_N, description="How many items (1-100)")
    page_type: PageType = Field("home", description="Page the list is shown on")
    device: Device = Field("web", description="Client device")
    debug: bool = Field(False, description="Add per-stage timings")

    @property
    def context(self) -> RequestContext:
        return RequestContext(self.page_type, self.device)


# Where each field comes from: the 422 names it there (``loc``), the OpenAPI parameter is declared there.
LOCATIONS: dict[str, str] = {name: "query" for name in RecommendationQuery.model_fields} | {"user_id": "path"}
QUERY_FIELDS = tuple(name for name, where in LOCATIONS.items() if where == "query")


@dataclass(frozen=True)
class InvalidQuery:
    """Why a request is not valid: FastAPI's list of errors, each naming its field (``loc``)."""

    errors: list[dict[str, Any]]


def parse(user_id: str, query_string: bytes) -> RecommendationQuery | InvalidQuery:
    """The request's query from the path's user id and the raw query string, or why it is not valid."""
    params = query_params(query_string)
    raw = {"user_id": user_id} | {name: params[name] for name in QUERY_FIELDS if name in params}
    try:
        return RecommendationQuery.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return InvalidQuery([{**error, "loc": (LOCATIONS[str(error["loc"][0])], *error["loc"])} for error in errors])


def query_params(query_string: bytes) -> dict[str, str]:
    """A query string's parameters as Starlette reads them (``QueryParams``: a repeated one's last value).

    Why not ``QueryParams`` itself: on the hot route it costs more than the rest of the parse. Without a
    ``%`` or ``+`` there is nothing to decode, so a split gives what ``parse_qsl`` gives (a test pins it).
    """
    text = query_string.decode("latin-1")
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    params: dict[str, str] = {}
    for part in text.split("&"):
        if part:
            key, _, value = part.partition("=")
            params[key] = value
    return params


def openapi_parameters() -> list[dict[str, Any]]:
    """The route's OpenAPI parameters, from the schema ``parse`` validates with."""
    schema = RecommendationQuery.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in schema["properties"].items():
        parameter = {"name": name, "in": LOCATIONS[name], "required": name in required, "schema": field_schema}
        if "description" in field_schema:
            parameter["description"] = field_schema["description"]
        parameters.append(parameter)
    return parameters


class RecommendationsResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    source: Literal["cache", "realtime", "precomputed", "session", "popular"]
    model_version: str
    fallback_reason: str | None = None
    timings_ms: dict[str, float] | None = None
    arm: Literal["active", "canary"] | None = None  # with debug=true: which arm served (docs/RELEASES.md)
    segment: str | None = None  # with debug=true, on a popular list: whose segment's (docs/SESSION.md)


def recommendation_body(result: Recommendation, timings_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The JSON answer (its schema: ``RecommendationsResponse``)."""
    body: dict[str, Any] = {
        "user_id": result.user_id,
        "items": [{"item_id": item, "score": score} for item, score in result.items],
        "source": result.source,
        "model_version": result.model_version,
    }
    if result.fallback_reason:
        body["fallback_reason"] = result.fallback_reason
    if timings_ms is not None:
        body["timings_ms"] = dict(timings_ms)
        body["arm"] = result.arm  # debug: the active version or the canary
        if result.segment is not None:
            body["segment"] = result.segment  # debug: which segment's popular list answered
    return body


async def answer(recommender: Recommender, query: RecommendationQuery) -> bytes:
    """The JSON body for a valid query, whichever route it came by."""
    started = time.perf_counter()
    result = await recommender.recommend(query.user_id, query.n, query.context)
    timings = result.timings_ms | {"total": round((time.perf_counter() - started) * 1000, 3)} if query.debug else None
    body = orjson.dumps(recommendation_body(result, timings))
    metrics.REQUEST_LATENCY.labels("recommendations", result.source).observe(time.perf_counter() - started)
    return body


def recommender_of(app: Any) -> Recommender:
    return services_of(app).recommender


router = APIRouter(default_response_class=ORJSONResponse)


@router.get(
    PATH,
    response_model=None,
    responses={200: {"model": RecommendationsResponse}, 422: {"description": "Invalid parameter"}},
    # Declared here, parsed by ``parse``: both from RecommendationQuery.
    openapi_extra={"parameters": openapi_parameters()},
)
async def recommendations(request: Request) -> Response:
    query = parse(request.path_params["user_id"], request.scope["query_string"])
    if isinstance(query, InvalidQuery):
        raise RequestValidationError(query.errors)
    return Response(await answer(recommender_of(request.app), query), media_type="application/json")


@router.get(PREFIX, include_in_schema=False)
@router.get(PREFIX.rstrip("/"), include_in_schema=False)
async def recommendations_without_user() -> ORJSONResponse:
    # Without this route an empty user id would be a bare 404; say what is wrong instead.
    detail = [{"type": "missing", "loc": ["path", "user_id"], "msg": "user_id must not be empty"}]
    return ORJSONResponse({"detail": detail}, status_code=422)
