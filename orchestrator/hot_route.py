"""The hot route: ``GET /v1/recommendations/{user_id}`` and ``POST /v1/events`` answered below FastAPI's
routing, dependency solving and response classes.

Why: a cache hit does a dictionary lookup, yet FastAPI's per-request machinery costs several times that
(profiled: routing, dependency solving and the response object took more than half of a hit's CPU).

What is valid is not decided here. Each endpoint's module owns its parser (``parse`` in
``orchestrator/api/recommendations.py``, ``parse_event`` in ``orchestrator/api/events.py``) and what it does
with a valid request (``answer``, ``take_event``); the FastAPI routes call the same functions. This route
takes a request only where FastAPI's routing would send it to that endpoint and the parser accepts it.
Everything else goes to FastAPI untouched, so every error and edge case keeps FastAPI's answer: a request
the parser refuses (FastAPI's route parses it again and answers the 422), a trailing slash, another
method, and an event without exactly one ``Content-Type: application/json`` or without a ``Content-Length``
within the body limit (the body read so far is handed on as it came). Who calls, and how often, was
decided before either route (``orchestrator/auth.py``, ``orchestrator/ratelimit.py``).
"""

from __future__ import annotations

import orjson

from orchestrator.api import events, recommendations
from orchestrator.api.shared import services_of
from orchestrator.guards import ASGIApp, Receive, Scope, Send, replay

JSON_HEADERS = (b"content-type", b"application/json")


class HotRoute:
    """ASGI middleware: answers what the endpoints' parsers accept, passes the rest on."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path.startswith(recommendations.PREFIX):
                user_id = path[len(recommendations.PREFIX) :]
                # FastAPI's route matches one non-empty path segment.
                if user_id and "/" not in user_id:
                    query = recommendations.parse(user_id, scope["query_string"])
                    if isinstance(query, recommendations.RecommendationQuery):
                        body = await recommendations.answer(recommendations.recommender_of(scope["app"]), query)
                        await _respond(send, 200, body, {})
                        return
            elif method == "POST" and path == events.PATH:
                await self._event(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _event(self, scope: Scope, receive: Receive, send: Send) -> None:
        length, content_types = None, []
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_types.append(value)
        canonical = (
            content_types == [b"application/json"]  # exactly one: with two, which one counts is FastAPI's call
            and length is not None
            and length.isdigit()
            and int(length) <= self.max_body_bytes
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
        event = events.parse_event("application/json", body)
        if isinstance(event, events.InvalidEvent):
            await self.app(scope, replay(body, receive), send)
            return
        outcome = await events.take_event(services_of(scope["app"]), event)
        await _respond(send, outcome.status, orjson.dumps(outcome.body), outcome.headers)


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw_headers = [JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
