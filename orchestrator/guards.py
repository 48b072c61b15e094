"""Protection at the edge: a bound on requests in flight (shed load at once with 503 + Retry-After rather
than queue without bound) taken only by complete requests (the body is read first, within a deadline: 408),
a request-body size limit, an API key and per-client rate limits for writes. Header, connection and idle
limits are the server's (``orchestrator/edge.py``)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException

from orchestrator import metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Probes and scrapes must answer even when the service is saturated.
UNGUARDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = orjson.dumps({"detail": detail})
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionLoad:
    """What admission control did lately, for /readyz: a replica that refuses every request for a sustained
    window is not ready (the load balancer should send elsewhere), though the process is healthy."""

    def __init__(self, max_in_flight: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight = max_in_flight
        self.window_s = window_s
        self.clock = clock
        self.in_flight = 0
        self.last_admitted = clock()
        self.last_refused: float | None = None

    def shedding_everything(self) -> bool:
        """True when nothing was admitted for ``window_s`` while requests were refused, or while every slot
        stayed taken."""
        quiet_s = self.clock() - self.last_admitted
        if quiet_s < self.window_s:
            return False
        refused_since = self.last_refused is not None and self.last_refused > self.last_admitted
        return refused_since or self.in_flight >= self.max_in_flight


class AdmissionControl:
    """At most ``max_in_flight`` requests inside the app; the next one gets 503 immediately.

    A request comes here complete (``CompleteRequest`` read its body before), so a slot is held only while
    the app works on it, never while a client is slow to send."""

    def __init__(
        self, app: ASGIApp, max_in_flight: int, retry_after_s: int = 1, load: AdmissionLoad | None = None
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.load = load or AdmissionLoad(max_in_flight, window_s=2.0)

    @property
    def in_flight(self) -> int:
        return self.load.in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        load = self.load
        if load.in_flight >= self.max_in_flight:
            metrics.SHED.inc()
            load.last_refused = load.clock()
            await send_json(
                send,
                503,
                f"overloaded: {load.in_flight} requests in flight (limit {self.max_in_flight}); retry later",
                {"Retry-After": str(self.retry_after_s)},
            )
            return
        load.in_flight += 1
        load.last_admitted = load.clock()
        try:
            await self.app(scope, receive, send)
        finally:
            load.in_flight -= 1


class CompleteRequest:
    """Reads a request's whole body, at most ``max_bytes`` (413) within ``timeout_s`` (408, and the connection
    is closed), before passing the request on; the app then reads it from memory.

    Why: admission control comes after this, so a client that sends its body slowly, or never, holds no
    slot (a few hundred stalled bodies made every call 503). A request without a body passes at once."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        length = None
        chunked = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if not chunked and (length is None or length == b"0"):
            await self.app(scope, receive, send)
            return
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_json(send, 413, f"request body of {int(length)} bytes exceeds the limit of {self.max_bytes}")
            return
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                more = True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away: nobody to answer
                        return
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > self.max_bytes:
                        await send_json(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            metrics.EDGE_REFUSED.labels(reason="body_timeout").inc()
            detail = f"request body not received within {self.timeout_s:g} s ({received} bytes arrived)"
            await send_json(send, 408, detail, {"Connection": "close"})
            return
        await self.app(scope, replay(b"".join(chunks), receive), send)


def replay(body: bytes, receive: Receive) -> Receive:
    """The request body, already read, as one message; then whatever the connection says next."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await send_json(send, 413, f"request body of {int(value)} bytes exceeds the limit of {self.max_bytes}")
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge as exc:
            await send_json(send, 413, str(exc.detail))


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing answers 413 instead of a generic 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds the limit of {max_bytes} bytes")


def api_key_matches(expected: str | None, presented: str | None) -> bool:
    if expected is None:
        return True
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


class RateLimiter:
    """Token bucket per client; remembers at most ``max_clients`` (least recently seen are forgotten)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, client: str) -> float:
        """0 if allowed; else the seconds to wait before a token is available."""
        now = self.clock()
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
        wait_s = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait_s = (1.0 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait_s
