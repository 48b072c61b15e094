"""The online service: creates the FastAPI app and includes one router per endpoint (``orchestrator/api/``).
Wiring happens in the lifespan (``orchestrator/composition.py``), never at import time; every error maps to
a 4xx/503 with a message, never a 500 for a dependency fault."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse

from orchestrator import gc_pauses, logs, telemetry
from orchestrator.api import events, health, recommendations, segments
from orchestrator.auth import AccessPolicy, ApiKeys, Authenticate, TrustedProxies
from orchestrator.composition import build_services, check, close_services
from orchestrator.config import Ablations, Settings, check_renamed
from orchestrator.errors import ClientError
from orchestrator.guards import AdmissionControl, AdmissionLoad, BodySizeLimit, CompleteRequest
from orchestrator.hot_route import HotRoute
from orchestrator.ratelimit import RateLimit
from orchestrator.request_id import RequestId

log = logging.getLogger("orchestrator")

# One per endpoint module, in the order FastAPI routes and documents them.
ROUTERS = (recommendations.router, events.router, segments.router, health.router)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Tracing first (off unless RECSERVE_TELEMETRY_OTLP_ENDPOINT is set), so that warm-up is traced too.
    stop_tracing = telemetry.start(app.state.settings.telemetry)
    app.state.services = await build_services(app.state.settings, app.state.ablations)
    # Everything built so far lives as long as the process. Frozen, it is left out of every later
    # collection: else the first full collection walks it all during a request (seen: 53 ms, past
    # the deadline of the first request a fresh pod served), and every later one again.
    gc.collect()
    gc.freeze()
    gc_pauses.install()
    try:
        yield
    finally:
        gc_pauses.uninstall()
        gc.unfreeze()
        await close_services(app.state.services)
        if stop_tracing is not None:
            stop_tracing()  # flushes the spans still batched


def create_app(settings: Settings | None = None, ablations: Ablations | None = None) -> FastAPI:
    """The app (uvicorn factory). Settings are read here, at server start, never at import; a choice no
    table of the composition root holds stops the start here too."""
    app = FastAPI(
        title="recserve",
        summary="Personalised recommendations: cache -> FAISS -> Redis features -> Triton ranking, with fallbacks.",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        # No redirect to the path with(out) a trailing slash: its Location would be built from the Host
        # header, which the client chooses. A path that is not a route is a 404.
        redirect_slashes=False,
    )
    app.add_exception_handler(ClientError, client_error)
    if settings is None:
        check_renamed(os.environ)
    app.state.settings = settings or Settings()
    # Log lines as the settings say (JSON by default), from here on: the warnings below are in the format too.
    logs.configure(app.state.settings.telemetry.log_format, app.state.settings.telemetry.log_level)
    app.state.ablations = ablations or Ablations()
    check(app.state.settings, app.state.ablations)
    for router in ROUTERS:
        app.include_router(router)
    # Added innermost first. A request meets: its request id (orchestrator/request_id.py), authentication (401
    # before anything else is done), the caller's rate limit (429 before its body is read), the whole body read
    # (408 past body_timeout_s, 413 past max_body_bytes), admission control (a slot only for a complete request),
    # the hot route (valid recommendation GETs and events, by the endpoints' own parsers), the body size cap,
    # then FastAPI's routing. Header limits and connection timeouts are the server's (orchestrator/edge.py).
    settings = app.state.settings
    limits = settings.limits
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if app.state.ablations.hot_route_enabled:
        app.add_middleware(HotRoute, max_body_bytes=limits.max_body_bytes)
    app.state.admission = AdmissionLoad(limits.max_in_flight, limits.shedding_window_s)  # /readyz reads it
    app.add_middleware(AdmissionControl, max_in_flight=limits.max_in_flight, load=app.state.admission)
    app.add_middleware(CompleteRequest, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(RateLimit, read_limit_on=settings.reads.rate_per_s > 0)
    keys = ApiKeys(settings.api_keys())  # reads the keys' file: at server start, never at import
    if not keys and not settings.events.anonymous_writes:
        log.warning("no API key is set (RECSERVE_EVENTS_API_KEYS, RECSERVE_EVENTS_API_KEYS_FILE): every write is 401")
    policy = AccessPolicy(settings.events.anonymous_writes, settings.reads.require_key)
    proxies = TrustedProxies(settings.limits.proxy_networks_text)
    app.add_middleware(Authenticate, keys=keys, policy=policy, proxies=proxies)
    # Outermost: every answer carries the request id, the hot route's, FastAPI's and a 401 alike.
    app.add_middleware(RequestId, access_log=settings.telemetry.access_log)
    return app


async def client_error(request: Request, exc: Exception) -> ORJSONResponse:
    """Every error that is the client's (``ClientError``): its status and message, no traceback logged."""
    assert isinstance(exc, ClientError)
    return ORJSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)
