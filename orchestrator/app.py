"""The online service: a thin FastAPI app over ``Recommender``. Wiring happens in the lifespan, never at
import time; every error maps to a 4xx/503 with a message, never a 500 for a dependency fault."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import orjson
from fastapi import APIRouter, FastAPI, Header, Path, Query, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis

from orchestrator import gc_pauses, metrics, schema
from orchestrator.cache import InvalidationFeed, LayeredCache, LocalTTLCache, NoCache, RecommendationCache
from orchestrator.config import Settings
from orchestrator.events import EventRecorder
from orchestrator.guards import AdmissionControl, BodySizeLimit, RateLimiter, Scope, api_key_matches
from orchestrator.hot_route import HotEvents, HotRoute, QueryRules, recommendation_body
from orchestrator.loop_lag import LoopLagMonitor
from orchestrator.naive import OneByOneBackend
from orchestrator.popular import PopularLists
from orchestrator.ranking import Ranker
from orchestrator.ranking.breaker import CircuitBreaker
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.ranking.triton_ranker import TritonRanker
from orchestrator.recommender import Recommender, RequestContext
from orchestrator.retrieval import FaissRetriever
from orchestrator.store import versions
from orchestrator.store.backend import Backend, Command, is_tls
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.coalesce import CoalescingBackend
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.errors import StoreUnavailable
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.precomputed import RedisPrecomputedStore
from orchestrator.store.sharded import ShardedBackend

log = logging.getLogger("orchestrator")

ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
ID_MAX_LENGTH = 64
MAX_N = 100
PageType = Literal["home", "product", "cart", "search", "category"]
Device = Literal["web", "ios", "android", "tv"]
UserId = Annotated[
    str,
    Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description="User id: 1-64 of [A-Za-z0-9._:@-]"),
]


@dataclass
class Services:
    settings: Settings
    backend: Backend
    pubsub: Redis
    retriever: FaissRetriever
    ranker: Ranker
    popular: PopularLists
    recommender: Recommender
    events: EventRecorder
    event_limiter: RateLimiter
    tasks: list[asyncio.Task[None]]


async def build_services(settings: Settings) -> Services:
    urls = settings.redis_url_list
    connection = settings.redis_connection
    backend: Backend
    if settings.redis_mode == "cluster":
        backend = await ClusterBackend.connect(urls[0], settings.redis_timeout_ms, connection)
    else:
        backend = ShardedBackend.from_urls(urls, settings.redis_timeout_ms, options=connection)
    if settings.redis_coalesce:
        backend = CoalescingBackend(backend)
    version = await versions.active(backend)
    retriever = await asyncio.to_thread(FaissRetriever, settings.index_path, settings.retrieval_inline_max_ms / 1000)
    log.info(
        "FAISS search takes %.3f ms: run %s",
        retriever.search_s * 1000,
        "on the event loop" if retriever.inline else "in a thread",
    )
    model_version = retriever.manifest.model_version
    if model_version != version.version:
        log.warning("index model version %s differs from the active Redis version %s", model_version, version.version)
    # Ablation: the naive design reads the store one GET at a time.
    reads: Backend = OneByOneBackend(backend) if settings.store_reads == "one_by_one" else backend
    ranker: Ranker
    if settings.triton_url:
        breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        ranker = TritonRanker(
            settings.triton_url,
            settings.triton_model,
            model_version,
            max_connection_age_s=settings.triton_max_connection_age_s,
            breaker=breaker,
        )
    else:
        ranker = await asyncio.to_thread(OnnxRanker, settings.onnx_model_path, model_version)
    # Pub/sub fans out cluster-wide, and in sharded mode every replica uses the same first shard.
    pubsub = Redis.from_url(urls[0], **connection.client_kwargs(is_tls(urls[0])))
    local = LocalTTLCache(settings.local_cache_size if settings.local_cache_enabled else 0, settings.local_cache_ttl_s)
    feed = InvalidationFeed(pubsub, local, settings.invalidation_max_silence_s)
    cache: RecommendationCache = (
        LayeredCache(local, backend, pubsub, settings.redis_cache_ttl_s, local_trusted=feed.alive)
        if settings.cache_enabled
        else NoCache()
    )
    features = RedisFeatureStore(reads, version.version)
    precomputed = RedisPrecomputedStore(backend)
    popular = PopularLists(precomputed)
    await popular.refresh()
    lag = LoopLagMonitor(settings.overload_loop_lag_ms / 1000) if settings.overload_loop_lag_ms > 0 else None
    recommender = Recommender(
        settings,
        cache,
        RedisEmbeddingStore(reads, version),
        features,
        retriever,
        ranker,
        precomputed,
        popular,
        n_items=len(retriever.item_ids),
        single_flight=settings.single_flight_enabled,
        overloaded=lag.overloaded if lag is not None else lambda: False,
    )
    tasks = [
        asyncio.create_task(feed.run()),
        asyncio.create_task(popular.refresh_forever(settings.popular_refresh_s)),
    ]
    if lag is not None:
        tasks.append(asyncio.create_task(lag.run()))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            await feed.subscribed.wait()
    if settings.warmup_timeout_s > 0:
        timings = await recommender.warm_up(retriever.manifest.dim, settings.warmup_timeout_s)
        log.info("warm-up before serving: %s", ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()) or "nothing")
    return Services(
        settings,
        backend,
        pubsub,
        retriever,
        ranker,
        popular,
        recommender,
        EventRecorder(backend, RedisFeatureStore(backend, version.version), cache),
        RateLimiter(settings.events_rate_per_s, settings.events_burst),
        tasks,
    )


async def close_services(services: Services) -> None:
    for task in services.tasks:
        task.cancel()
    await asyncio.gather(*services.tasks, return_exceptions=True)
    await services.recommender.drain()
    if isinstance(services.ranker, TritonRanker):
        await services.ranker.aclose()
    await services.pubsub.aclose()
    await services.backend.aclose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.services = await build_services(app.state.settings)
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


router = APIRouter(default_response_class=ORJSONResponse)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app (uvicorn factory). Settings are read here, at server start, never at import."""
    app = FastAPI(
        title="recserve",
        summary="Personalised recommendations: cache -> FAISS -> Redis features -> Triton ranking, with fallbacks.",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.settings = settings or Settings()
    app.include_router(router)
    # Added innermost first. A request meets: admission control (shed before reading anything), the hot
    # route (well-formed recommendation GETs), the body size cap, then FastAPI's routing.
    app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    if app.state.settings.hot_route_enabled:
        events_route = HotEvents(hot_event, app.state.settings.max_body_bytes)
        app.add_middleware(HotRoute, rules=HOT_ROUTE_RULES, recommender_of=recommender_of, events=events_route)
    app.add_middleware(AdmissionControl, max_in_flight=app.state.settings.max_in_flight)
    return app


def recommender_of(scope: Scope) -> Recommender:
    recommender: Recommender = scope["app"].state.services.recommender
    return recommender


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


# -- response and request models (for validation and the OpenAPI spec) ------------------------------


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendationsResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    source: Literal["cache", "realtime", "precomputed", "popular"]
    model_version: str
    fallback_reason: str | None = None
    timings_ms: dict[str, float] | None = None


class SegmentResponse(BaseModel):
    segment: str
    items: list[ScoredItem]
    source: Literal["popular"]
    model_version: str


class EventIn(BaseModel):
    model_config = {"extra": "forbid"}

    user_id: str = Field(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)
    item_id: str = Field(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)
    type: Literal["view", "click", "add_to_cart", "purchase"]


class EventAccepted(BaseModel):
    status: Literal["accepted"]
    id: str


class Problem(BaseModel):
    detail: str


# -- endpoints ----------------------------------------------------------------------------------------


@router.get(
    "/v1/recommendations/{user_id}",
    response_model=None,
    responses={200: {"model": RecommendationsResponse}, 422: {"description": "Invalid parameter"}},
)
async def recommendations(
    request: Request,
    user_id: UserId,
    n: Annotated[int, Query(ge=1, le=MAX_N, description="How many items (1-100)")] = 20,
    page_type: Annotated[PageType, Query(description="Page the list is shown on")] = "home",
    device: Annotated[Device, Query(description="Client device")] = "web",
    debug: Annotated[bool, Query(description="Add per-stage timings")] = False,
) -> ORJSONResponse:
    started = time.perf_counter()
    services = services_of(request)
    result = await services.recommender.recommend(user_id, n, RequestContext(page_type, device))
    timings = result.timings_ms | {"total": round((time.perf_counter() - started) * 1000, 3)} if debug else None
    body = recommendation_body(result, timings)
    metrics.REQUEST_LATENCY.labels("recommendations", result.source).observe(time.perf_counter() - started)
    return ORJSONResponse(body)


# The hot route (orchestrator/hot_route.py) answers the well-formed requests of the route above without
# FastAPI's per-request machinery; it accepts exactly what these declarations accept, from these constants.
HOT_ROUTE_RULES = QueryRules(
    ID_PATTERN, ID_MAX_LENGTH, MAX_N, frozenset(get_args(PageType)), frozenset(get_args(Device))
)


@router.get("/v1/recommendations/", include_in_schema=False)
@router.get("/v1/recommendations", include_in_schema=False)
async def recommendations_without_user() -> ORJSONResponse:
    # Without this route an empty user id would be a bare 404; say what is wrong instead.
    detail = [{"type": "missing", "loc": ["path", "user_id"], "msg": "user_id must not be empty"}]
    return ORJSONResponse({"detail": detail}, status_code=422)


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventAccepted,
    responses={
        401: {"model": Problem, "description": "Missing or wrong X-API-Key"},
        429: {"model": Problem, "description": "Too many events from this client"},
        503: {"model": Problem, "description": "The event could not be stored; retry"},
    },
)
async def events(
    request: Request,
    event: EventIn,
    x_api_key: Annotated[str | None, Header(description="Required when the service has an API key")] = None,
) -> ORJSONResponse:
    outcome = await take_event(services_of(request), event, x_api_key, request.client.host if request.client else None)
    return ORJSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)


@dataclass(frozen=True)
class EventOutcome:
    status: int
    body: dict[str, str]
    headers: dict[str, str]


async def take_event(
    services: Services, event: EventIn, x_api_key: str | None, client_host: str | None
) -> EventOutcome:
    """Everything ``POST /v1/events`` does once the body is valid; the hot route calls it too."""
    started = time.perf_counter()
    expected = services.settings.api_key.get_secret_value() if services.settings.api_key else None
    if not api_key_matches(expected, x_api_key):
        metrics.REJECTED_WRITES.labels("auth").inc()
        return EventOutcome(401, {"detail": "missing or invalid X-API-Key header"}, {})
    wait_s = services.event_limiter.acquire(x_api_key or client_host or "unknown")
    if wait_s > 0:
        metrics.REJECTED_WRITES.labels("rate_limit").inc()
        return EventOutcome(
            429,
            {"detail": f"rate limit of {services.settings.events_rate_per_s:g} events/s exceeded"},
            {"Retry-After": str(max(1, round(wait_s)))},
        )
    try:
        entry = await services.events.record(event.user_id, event.item_id, event.type)
    except StoreUnavailable as exc:
        metrics.REQUEST_LATENCY.labels("events", "error").observe(time.perf_counter() - started)
        return EventOutcome(503, {"detail": f"event not stored: {exc}"}, {"Retry-After": "1"})
    metrics.REQUEST_LATENCY.labels("events", "stored").observe(time.perf_counter() - started)
    return EventOutcome(202, {"status": "accepted", "id": entry}, {})


async def hot_event(scope: Scope, body: bytes, x_api_key: str | None) -> tuple[int, bytes, dict[str, str]] | None:
    """The hot route's events handler: None (let FastAPI answer) unless ``body`` is a valid event."""
    try:
        event = EventIn.model_validate_json(body)
    except ValidationError:
        return None
    client = scope.get("client")
    services: Services = scope["app"].state.services
    outcome = await take_event(services, event, x_api_key, client[0] if client else None)
    return outcome.status, orjson.dumps(outcome.body), outcome.headers


@router.get(
    "/v1/segments/{segment}/recommendations",
    response_model=None,
    responses={
        200: {"model": SegmentResponse},
        304: {"description": "Not modified (If-None-Match)"},
        404: {"model": Problem},
    },
)
async def segment_recommendations(
    request: Request,
    segment: Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[a-z0-9]+$")],
    n: Annotated[int, Query(ge=1, le=MAX_N)] = 20,
) -> Response:
    started = time.perf_counter()
    services = services_of(request)
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
    headers = {"ETag": etag, "Cache-Control": f"public, max-age={services.settings.segment_max_age_s}"}
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


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", response_model=None, responses={503: {"description": "Cannot serve at all"}})
async def readyz(request: Request) -> ORJSONResponse:
    """Ready while it can answer at all (popular lists in memory, index loaded); says what is degraded."""
    services = services_of(request)
    components: dict[str, str] = {}
    try:
        async with asyncio.timeout(0.5):
            await services.backend.control(Command("PING", "dp:active"))
        components["redis"] = "ok"
    except (StoreUnavailable, TimeoutError, OSError):
        components["redis"] = "unreachable"
    components["index"] = f"ok ({len(services.retriever.item_ids)} items)"
    if isinstance(services.ranker, TritonRanker):
        ready = await services.ranker.ready()
        components["ranker"] = (
            "ok (triton)" if ready else f"unreachable (triton, circuit {services.ranker.breaker.state})"
        )
    else:
        components["ranker"] = "ok (in-process onnxruntime)"
    components["popular"] = "ok" if services.popular.loaded else "not loaded"
    degraded = sorted(name for name, state in components.items() if not state.startswith("ok"))
    can_serve = services.popular.loaded
    body = {
        "status": ("degraded" if degraded else "ready") if can_serve else "unavailable",
        "degraded": degraded,
        "components": components,
        "model_version": services.ranker.model_version,
    }
    return ORJSONResponse(body, status_code=200 if can_serve else 503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
