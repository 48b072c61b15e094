"""The hot route: ``GET /v1/recommendations/{user_id}`` with well-formed parameters, and ``POST /v1/events``
with a valid JSON body, answered below FastAPI's routing, dependency solving and response classes.

Why: a cache hit does a dictionary lookup, yet FastAPI's per-request machinery costs several times that
(profiled: routing, dependency solving and the response object took more than half of a hit's CPU). The flow
behind it is the same ``Recommender.recommend`` and the body the same ``recommendation_body``.

The parser accepts only a canonical subset it can validate exactly as the FastAPI route does (the route
still declares the API: OpenAPI, 422 messages). Anything else — a bad or percent-encoded value, a
repeated parameter, ``debug``, a trailing slash, a method other than GET — goes to FastAPI untouched,
so every error message and every edge case keeps FastAPI's behaviour. An event is taken only with
``Content-Type: application/json``, a ``Content-Length`` within the body limit, at most one ``X-API-Key``
and a body the route's own model accepts; otherwise the body read so far is handed to FastAPI as it came.
What happens to a valid event is one function for both (``take_event`` in orchestrator/app.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from orchestrator import metrics
from orchestrator.guards import ASGIApp, Message, Receive, Scope, Send
from orchestrator.recommender import Recommendation, RequestContext

PREFIX = "/v1/recommendations/"
EVENTS_PATH = "/v1/events"
DEFAULT_N = 20


@dataclass(frozen=True)
class HotRequest:
    user_id: str
    n: int
    context: RequestContext


class QueryRules:
    """What the FastAPI route accepts, from the same constants (orchestrator/app.py builds it)."""

    def __init__(
        self, id_pattern: str, id_max_length: int, max_n: int, page_types: frozenset[str], devices: frozenset[str]
    ) -> None:
        self.id_pattern = re.compile(id_pattern)
        self.id_max_length = id_max_length
        self.max_n = max_n
        self.page_types = page_types
        self.devices = devices

    def parse(self, method: str, path: str, query_string: bytes) -> HotRequest | None:
        """The request, if it is a well-formed one in the canonical subset; None: let FastAPI handle it."""
        if method != "GET" or not path.startswith(PREFIX):
            return None
        user_id = path[len(PREFIX) :]
        if not 1 <= len(user_id) <= self.id_max_length or self.id_pattern.fullmatch(user_id) is None:
            return None
        params: dict[str, str] = {}
        if query_string:
            for part in query_string.decode("latin-1").split("&"):
                key, sep, value = part.partition("=")
                if not sep or key in params or not key.isascii() or not key.replace("_", "").isalnum():
                    return None  # malformed, repeated, or an encoded key that might decode to a known one
                params[key] = value
        n = DEFAULT_N
        if "n" in params:
            raw = params["n"]
            # Plain decimal only (no sign, no leading zero): pydantic's other spellings go to FastAPI.
            if not (raw.isascii() and raw.isdigit() and raw[0] != "0" and len(raw) <= 4):
                return None
            n = int(raw)
            if n > self.max_n:
                return None
        page_type = params.get("page_type", "home")
        device = params.get("device", "web")
        if page_type not in self.page_types or device not in self.devices or "debug" in params:
            return None
        return HotRequest(user_id, n, RequestContext(page_type, device))


def recommendation_body(result: Recommendation, timings_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The JSON answer of both routes (the schema is ``RecommendationsResponse`` in orchestrator/app.py)."""
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
    return body


JSON_HEADERS = (b"content-type", b"application/json")

# (scope, body, X-API-Key) -> (status, body, headers), or None where the body is not a valid event.
EventHandler = Callable[[Scope, bytes, str | None], Awaitable[tuple[int, bytes, dict[str, str]] | None]]


@dataclass(frozen=True)
class HotEvents:
    handle: EventHandler
    max_body_bytes: int


class HotRoute:
    """ASGI middleware: answers what ``rules`` accepts with ``recommender_of(scope)``, and valid events with
    ``events``; passes the rest on."""

    def __init__(
        self,
        app: ASGIApp,
        rules: QueryRules,
        recommender_of: Callable[[Scope], Any],
        events: HotEvents | None = None,
    ) -> None:
        self.app = app
        self.rules = rules
        self.recommender_of = recommender_of
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = None
        if scope["type"] == "http":
            if self.events is not None and scope["path"] == EVENTS_PATH and scope["method"] == "POST":
                await self._event(scope, receive, send, self.events)
                return
            hot = self.rules.parse(scope["method"], scope["path"], scope["query_string"])
        if hot is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        result: Recommendation = await self.recommender_of(scope).recommend(hot.user_id, hot.n, hot.context)
        body = orjson.dumps(recommendation_body(result))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        metrics.REQUEST_LATENCY.labels("recommendations", result.source).observe(time.perf_counter() - started)

    async def _event(self, scope: Scope, receive: Receive, send: Send, events: HotEvents) -> None:
        length, content_types, api_keys = None, [], []
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_types.append(value)
            elif name == b"x-api-key":
                api_keys.append(value.decode("latin-1"))
        canonical = (
            content_types == [b"application/json"]  # exactly one: with two, which one counts is FastAPI's call
            and length is not None
            and length.isdigit()
            and int(length) <= events.max_body_bytes
            and len(api_keys) <= 1
        )
        if not canonical:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        answer = await events.handle(scope, body, api_keys[0] if api_keys else None)
        if answer is None:
            await self.app(scope, _replay(body, receive), send)
            return
        status, content, headers = answer
        raw_headers = [JSON_HEADERS, (b"content-length", str(len(content)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The request body once more (already read here), then whatever the connection says next."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
