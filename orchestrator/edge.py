"""The HTTP server's own limits, below the ASGI app: header size and count (431), time to send the headers
(408, or a silent close for a connection that never said anything), time to send a body, keep-alive, and
open connections per process.

Why here: uvicorn's httptools protocol (uvicorn 0.54) has none of these. httptools buffers a header of any
size, a connection that sends its headers one byte at a time is never timed out (uvicorn's keep-alive timer
runs only between requests, and every byte received cancels it), and ``--limit-concurrency`` answers 503 only
once a request's headers are complete, so idle connections are never refused. An ASGI middleware cannot help:
it sees a request only once its headers are complete.

Served with ``--http orchestrator.edge:EdgeHttpProtocol`` (``orchestrator/__main__.py``, ``stack/launch.py``
and the online image's ENTRYPOINT); the limits are the app's settings (``RECSERVE_LIMITS_*``), read from the
app the factory built.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from orchestrator import metrics
from orchestrator.config import LimitsSettings

# The app answers a stalled body with 408 itself (orchestrator/guards.py CompleteRequest) at body_timeout_s;
# the server closes the connection this much later, for a body no app reads (a 401 was already sent).
BODY_CLOSE_GRACE_S = 1.0


@dataclass(frozen=True)
class EdgeLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    max_connections: int

    @classmethod
    def of(cls, limits: LimitsSettings) -> EdgeLimits:
        return cls(
            limits.max_header_bytes,
            limits.max_headers,
            limits.header_timeout_s,
            limits.body_timeout_s,
            limits.keep_alive_s,
            limits.max_connections,
        )


_LIMITS: dict[int, EdgeLimits] = {}


def limits_of(config: Config) -> EdgeLimits:
    """The limits of the app uvicorn loaded (its ``state.settings``, found below uvicorn's wrappers); the
    defaults for an app without settings (the load test's ceiling app). Looked up once per server."""
    found = _LIMITS.get(id(config))
    if found is None:
        app: Any = config.loaded_app
        settings = None
        while app is not None and settings is None:
            settings = getattr(getattr(app, "state", None), "settings", None)
            app = getattr(app, "app", None)
        limits = getattr(settings, "limits", None)
        found = EdgeLimits.of(limits if isinstance(limits, LimitsSettings) else LimitsSettings())
        _LIMITS[id(config)] = found
    return found


class Refused(Exception):
    """Raised in a parser callback to stop parsing; the connection is answered ``status`` and closed."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits_of(config)
        self.timeout_keep_alive = self.limits.keep_alive_s  # type: ignore[assignment]  # uvicorn types it int
        self._reading_headers = True  # from the connection's opening, then from each request's first byte
        self._header_bytes = 0  # bytes received while this request's headers were incomplete (an upper bound)
        self._read_timer: asyncio.TimerHandle | None = None
        self._answered = False
        self._silent = True  # nothing received yet on this connection
        self._requests_begun = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                Refused(503, "connections", f"{self.limits.max_connections} connections open already; retry later")
            )
            return
        # Also bounds a connection that never sends a byte.
        self._arm(self.limits.header_timeout_s, "header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        # Counted only when the same request was already in its headers before this chunk: a chunk that ends
        # one request and begins the next is not counted against the next (no false 431 when pipelining); the
        # memory bound is then the limit plus one read.
        counted = self._reading_headers
        begun = self._requests_begun
        self._silent = False
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, Refused):
                self._refuse(exc.__context__)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if counted and self._reading_headers and begun == self._requests_begun:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large(self._header_bytes))

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._requests_begun += 1
        if not self._reading_headers:  # the next request on a kept-alive connection
            self._reading_headers, self._header_bytes = True, 0
            self._arm(self.limits.header_timeout_s, "header_timeout")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_headers:
            raise Refused(431, "too_many_headers", f"more than {self.limits.max_headers} header lines")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            raise self._too_large(size)
        self._reading_headers = False
        self._arm(self.limits.body_timeout_s + BODY_CLOSE_GRACE_S, "body_timeout")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # Limits

    def _too_large(self, size: int) -> Refused:
        return Refused(
            431, "header_too_large", f"request line and headers of {size} bytes exceed {self.limits.max_header_bytes}"
        )

    def _arm(self, delay_s: float, reason: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay_s, self._timed_out, reason)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self, reason: str) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if reason == "header_timeout" and self._silent:
            # Nothing of a request arrived (an idle connection): close it without a word.
            metrics.EDGE_REFUSED.labels(reason="idle").inc()
            self.transport.close()
        elif cycle is None or cycle.response_complete or not cycle.response_started:
            detail = f"request not received within {self.limits.header_timeout_s:g} s"
            if reason == "body_timeout":
                detail = f"request body not received within {self.limits.body_timeout_s:g} s"
            self._refuse(Refused(408, reason, detail), answer=cycle is None or not cycle.response_started)
        else:  # the app is answering: let it finish, then close
            cycle.keep_alive = False

    def _refuse(self, refusal: Refused, answer: bool = True) -> None:
        """Answer ``refusal`` (unless a response was already sent) and close the connection."""
        metrics.EDGE_REFUSED.labels(reason=refusal.reason).inc()
        self._answered = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app, if it runs, answers nobody
            self.cycle.message_event.set()
        if answer and not self.transport.is_closing():
            body = refusal.detail.encode()
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[refusal.status],
                        b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: " + str(len(body)).encode() + b"\r\n",
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
        self.transport.close()
