"""A request id for every request: the caller's ``X-Request-Id`` when it is well-formed (a gateway's, so that one
id follows the request across services), else a new one. It is returned in the ``X-Request-Id`` response
header, carried by every log line the request causes (``orchestrator/logs.py``), and names the request's span
when tracing is on (``orchestrator/telemetry.py``).

The outermost middleware: it sees every answer, the hot route's and FastAPI's, a 401 or 429 too.
"""

from __future__ import annotations

import logging
import os
import re
import time

from orchestrator import telemetry
from orchestrator.guards import ASGIApp, Message, Receive, Scope, Send
from orchestrator.logs import REQUEST_ID
from orchestrator.routes import RECOMMENDATIONS_PATH, RECOMMENDATIONS_PREFIX

HEADER = b"x-request-id"
# What a log pipeline and a header can carry unescaped; anything else (too long, spaces, quotes) is replaced,
# never echoed: the id is written into log lines and a response header.
WELL_FORMED = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")

access = logging.getLogger("orchestrator.access")


def new_id() -> str:
    return os.urandom(16).hex()


def route_of(path: str) -> str:
    """The route, not the path: a span or log name must not hold a user id (cardinality, privacy)."""
    if path.startswith(RECOMMENDATIONS_PREFIX):
        return RECOMMENDATIONS_PATH
    return path


class RequestId:
    """ASGI middleware: the request's id (and span, and access line when asked)."""

    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == HEADER:
                if WELL_FORMED.fullmatch(value):
                    request_id = value.decode("ascii")
                break
        request_id = request_id or new_id()
        token = REQUEST_ID.set(request_id)
        header = (HEADER, request_id.encode("ascii"))
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        started = time.perf_counter() if self.access_log else 0.0
        # Tracing off: the shared no-op, and no span name is even built.
        request_span = (
            telemetry.request_span(f"{scope['method']} {route_of(scope['path'])}", scope["headers"], request_id)
            if telemetry.enabled()
            else telemetry.NOOP
        )
        try:
            with request_span as span:
                await self.app(scope, receive, send_with_id)
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
        finally:
            if self.access_log:
                access.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "route": route_of(scope["path"]),
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    },
                )
            REQUEST_ID.reset(token)
