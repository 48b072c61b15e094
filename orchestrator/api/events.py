"""``POST /v1/events``: its body spec, its one parser, what it does with a valid event, and its route.

``EventIn`` is the spec: ``parse_event`` reads a body with it as FastAPI reads a JSON body, the route
declares its OpenAPI request body from its JSON schema, and the hot route (``orchestrator/hot_route.py``)
calls the same ``parse_event`` and ``take_event``. A body ``parse_event`` refuses gets FastAPI's 422 (or
its 400 for a body that is not text), whichever path it came in by.
"""

from __future__ import annotations

import email.message
import json
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from orchestrator import metrics
from orchestrator.api.shared import Id, Problem, services_of
from orchestrator.composition import Services
from orchestrator.events import EventInProgress
from orchestrator.request_id import WELL_FORMED
from orchestrator.store.errors import StoreUnavailable

PATH = "/v1/events"


# What orchestrator/request_id.py accepts as a request id (and so what an answer's X-Request-Id can be).
RequestId = Annotated[str, Field(pattern=f"^{WELL_FORMED.pattern.decode()}$")]


class EventIn(BaseModel):
    model_config = {"extra": "forbid"}

    user_id: Id
    item_id: Id
    type: Literal["view", "click", "add_to_cart", "purchase"]
    event_id: Id | None = Field(
        None,
        description="Optional id the client chose for this event: a retry with the same id (after a 503 or a "
        "timeout) is stored once, and answered with the first one's entry id.",
    )
    request_id: RequestId | None = Field(
        None,
        description="Optional: the X-Request-Id of the recommendation answer this event follows (a click on one "
        "of its items, say). Stored with the event, and counted by the model version and arm that serve the user "
        "(recserve_attributed_events_total): a canary's events per answer against the active version's.",
    )


class EventAccepted(BaseModel):
    status: Literal["accepted"]
    id: str


EVENT = TypeAdapter(EventIn)


@dataclass(frozen=True)
class InvalidEvent:
    """Why a body is not an event: FastAPI's list of 422 errors (``loc`` names the field); with ``status``
    400, a body that is not JSON text at all (``detail`` says why)."""

    errors: list[dict[str, Any]]
    status: int = 422
    detail: str = ""

    def exception(self) -> HTTPException | RequestValidationError:
        if self.status == 400:
            return HTTPException(400, self.detail)
        return RequestValidationError(self.errors)


class _NotPlainJson(ValueError):
    """Valid to Python's parser, refused by ours: a duplicate key, NaN/Infinity, a non-finite number."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Which of two values counts differs between parsers (first here, last there): refuse, not guess.
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise _NotPlainJson(f"duplicate key {key[:64]!r}")
        value[key] = item
    return value


def _no_constant(name: str) -> Any:
    raise _NotPlainJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999: a float past the range, read as infinity
        raise _NotPlainJson(f"the number {text[:20]} is out of range")
    return number


def _json_invalid(position: int, why: str) -> InvalidEvent:
    error = {"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error", "input": {}}
    return InvalidEvent([error | {"ctx": {"error": why}}])


def parse_event(content_type: str | None, body: bytes) -> EventIn | InvalidEvent:
    """The event in a request body. As FastAPI reads a JSON body: the body is parsed as JSON only when its
    Content-Type says JSON (``application/json``, ``application/*+json``), else validated as the bytes it
    is (and refused); an empty body is a missing one. Stricter than FastAPI on what JSON is: NaN, Infinity,
    out-of-range numbers and duplicate keys are refused (422, naming what), text that is not UTF-8 and
    nesting past the parser's depth are 400 with the reason; nothing a client sends is a 500."""
    if not body:
        return InvalidEvent([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    value: Any = body
    if content_type and _says_json(content_type):
        try:
            value = json.loads(
                body, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant, parse_float=_finite
            )
        except json.JSONDecodeError as exc:
            return _json_invalid(exc.pos, exc.msg)
        except _NotPlainJson as exc:
            return _json_invalid(0, str(exc))
        except UnicodeDecodeError:
            return InvalidEvent([], status=400, detail="expected a JSON body in UTF-8, but found bytes that are not")
        except RecursionError:
            return InvalidEvent(
                [], status=400, detail="expected a flat JSON object, but found nesting too deep to read"
            )
        except ValueError as exc:  # an integer past Python's digit limit, an unknown text encoding
            return InvalidEvent([], status=400, detail=f"expected a JSON body, but found one that is not: {exc}")
    try:
        return EVENT.validate_python(value, from_attributes=True)
    except ValidationError as exc:
        return InvalidEvent(
            [
                {**error, "loc": ("body", *error["loc"]), "input": _echo(error.get("input"))}
                for error in exc.errors(include_url=False)
            ]
        )


def _echo(value: Any) -> Any:
    """What a 422 shows of a refused input: JSON values as they came, a body not parsed as JSON as its text
    (as FastAPI shows it), and one that is not UTF-8 only by its size (FastAPI's handler fails on it: a 500)."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return f"<{len(value)} bytes, not UTF-8>"
    return value


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
    body: dict[str, Any]
    headers: dict[str, str]


async def take_event(services: Services, event: EventIn) -> EventOutcome:
    """Everything ``POST /v1/events`` does with a valid event, whichever route it came by. The caller was
    authenticated and rate-limited before the body was read (``orchestrator/auth.py``, ``ratelimit.py``)."""
    started = time.perf_counter()
    if event.item_id not in services.catalogue:
        # O(1): the item ids of the index this replica serves. An unknown id would create keys for nothing.
        metrics.REJECTED_WRITES.labels("unknown_item").inc()
        error = {
            "type": "unknown_item",
            "loc": ("body", "item_id"),
            "msg": "expected an item of the catalogue, but found an id it does not hold",
            "input": event.item_id,
        }
        return EventOutcome(422, {"detail": [error]}, {})
    try:
        entry = await services.events.record(event.user_id, event.item_id, event.type, event.event_id, event.request_id)
    except EventInProgress as exc:
        return EventOutcome(exc.status, {"detail": exc.detail}, exc.headers)
    except StoreUnavailable as exc:
        metrics.REQUEST_LATENCY.labels("events", "error").observe(time.perf_counter() - started)
        detail = f"event not stored: {exc}; retry with the same event_id to store it once"
        return EventOutcome(503, {"detail": detail}, {"Retry-After": "1"})
    metrics.REQUEST_LATENCY.labels("events", "stored").observe(time.perf_counter() - started)
    if event.request_id is not None:
        # The arm is a stable hash of the user (orchestrator/recommender.py pick): the one that served the quoted
        # answer unless the canary moved since; the stream keeps the request id for the exact join.
        version, arm = services.recommender.pick(event.user_id)
        metrics.ATTRIBUTED_EVENTS.labels(version.version, arm, event.type).inc()
    return EventOutcome(202, {"status": "accepted", "id": entry}, {})


router = APIRouter(default_response_class=ORJSONResponse)


@router.post(
    PATH,
    status_code=202,
    response_model=EventAccepted,
    responses={
        401: {"model": Problem, "description": "Missing or wrong X-API-Key"},
        409: {"model": Problem, "description": "This event_id is being stored right now; retry"},
        429: {"model": Problem, "description": "Too many events from this caller"},
        503: {"model": Problem, "description": "The event could not be stored; retry (with its event_id)"},
    },
    # Declared here, read by ``parse_event``: both from EventIn.
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": EventIn.model_json_schema()}}}
    },
)
async def events(
    request: Request,
    x_api_key: Annotated[
        str | None, Header(description="A named API key (required unless anonymous writes are on)")
    ] = None,
) -> ORJSONResponse:
    del x_api_key  # checked before the request got here (orchestrator/auth.py); declared for the API's spec
    event = parse_event(request.headers.get("content-type"), await request.body())
    if isinstance(event, InvalidEvent):
        raise event.exception()
    outcome = await take_event(services_of(request.app), event)
    return ORJSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)
