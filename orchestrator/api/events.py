"""``POST /v1/events``: its body spec, its one parser, what it does with a valid event, and its route.

``EventIn`` is the spec: ``parse_event`` reads a body with it as FastAPI reads a JSON body, the route
declares its OpenAPI request body from its JSON schema, and the hot route (``orchestrator/hot_route.py``)
calls the same ``parse_event`` and ``take_event``. A body ``parse_event`` refuses gets FastAPI's 422 (or
its 400 for a body that is not text), whichever path it came in by.
"""

from __future__ import annotations

import email.message
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

from orchestrator import metrics
from orchestrator.api.shared import Id, Problem, services_of
from orchestrator.composition import Services
from orchestrator.guards import api_key_matches
from orchestrator.store.errors import StoreUnavailable

PATH = "/v1/events"


class EventIn(BaseModel):
    model_config = {"extra": "forbid"}

    user_id: Id
    item_id: Id
    type: Literal["view", "click", "add_to_cart", "purchase"]


class EventAccepted(BaseModel):
    status: Literal["accepted"]
    id: str


EVENT = TypeAdapter(EventIn)
UNREADABLE_BODY = "There was an error parsing the body"


@dataclass(frozen=True)
class InvalidEvent:
    """Why a body is not an event: FastAPI's list of 422 errors (``loc`` names the field); with ``status``
    400, a body that could not be decoded at all (FastAPI's answer to that)."""

    errors: list[dict[str, Any]]
    status: int = 422

    def exception(self) -> HTTPException | RequestValidationError:
        if self.status == 400:
            return HTTPException(400, UNREADABLE_BODY)
        return RequestValidationError(self.errors)


def parse_event(content_type: str | None, body: bytes) -> EventIn | InvalidEvent:
    """The event in a request body. As FastAPI reads a JSON body: the body is parsed as JSON only when its
    Content-Type says JSON (``application/json``, ``application/*+json``), else validated as the bytes it
    is (and refused); an empty body is a missing one."""
    if not body:
        return InvalidEvent([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    value: Any = body
    if content_type and _says_json(content_type):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}}
            return InvalidEvent([error | {"ctx": {"error": exc.msg}}])
        except (ValueError, RecursionError):  # not UTF-8/16/32 text, or nested past the parser's depth
            return InvalidEvent([], status=400)
    try:
        return EVENT.validate_python(value, from_attributes=True)
    except ValidationError as exc:
        return InvalidEvent([{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)])


def _says_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


@dataclass(frozen=True)
class EventOutcome:
    status: int
    body: dict[str, str]
    headers: dict[str, str]


async def take_event(
    services: Services, event: EventIn, x_api_key: str | None, client_host: str | None
) -> EventOutcome:
    """Everything ``POST /v1/events`` does with a valid event, whichever route it came by."""
    started = time.perf_counter()
    api_key = services.settings.events.api_key
    expected = api_key.get_secret_value() if api_key else None
    if not api_key_matches(expected, x_api_key):
        metrics.REJECTED_WRITES.labels("auth").inc()
        return EventOutcome(401, {"detail": "missing or invalid X-API-Key header"}, {})
    wait_s = services.event_limiter.acquire(x_api_key or client_host or "unknown")
    if wait_s > 0:
        metrics.REJECTED_WRITES.labels("rate_limit").inc()
        return EventOutcome(
            429,
            {"detail": f"rate limit of {services.settings.events.rate_per_s:g} events/s exceeded"},
            {"Retry-After": str(max(1, round(wait_s)))},
        )
    try:
        entry = await services.events.record(event.user_id, event.item_id, event.type)
    except StoreUnavailable as exc:
        metrics.REQUEST_LATENCY.labels("events", "error").observe(time.perf_counter() - started)
        return EventOutcome(503, {"detail": f"event not stored: {exc}"}, {"Retry-After": "1"})
    metrics.REQUEST_LATENCY.labels("events", "stored").observe(time.perf_counter() - started)
    return EventOutcome(202, {"status": "accepted", "id": entry}, {})


router = APIRouter(default_response_class=ORJSONResponse)


@router.post(
    PATH,
    status_code=202,
    response_model=EventAccepted,
    responses={
        401: {"model": Problem, "description": "Missing or wrong X-API-Key"},
        429: {"model": Problem, "description": "Too many events from this client"},
        503: {"model": Problem, "description": "The event could not be stored; retry"},
    },
    # Declared here, read by ``parse_event``: both from EventIn.
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": EventIn.model_json_schema()}}}
    },
)
async def events(
    request: Request,
    x_api_key: Annotated[str | None, Header(description="Required when the service has an API key")] = None,
) -> ORJSONResponse:
    event = parse_event(request.headers.get("content-type"), await request.body())
    if isinstance(event, InvalidEvent):
        raise event.exception()
    client_host = request.client.host if request.client else None
    outcome = await take_event(services_of(request.app), event, x_api_key, client_host)
    return ORJSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)
