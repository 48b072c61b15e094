"""The composition root: the one place that reads the settings and builds the service graph.

Which store topology, which store reads and which ranker run is looked up in a table of factories (as
Feast's ``ONLINE_STORE_CLASS_FOR_TYPE``), never decided by ``isinstance`` chains elsewhere. Adding a topology
or a ranker is its module beside its seam (``orchestrator/store/``, ``orchestrator/ranking/``) plus its
line in a table here. The factories are here, not in those modules, so that the data-plane code the
offline pipeline shares knows nothing of the service's settings. Closing and ``/readyz`` ask every part
the same questions (the seams' ``aclose`` and ``ready``), whichever backend it is.

Built in the FastAPI lifespan (``orchestrator/app.py``), never at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis

from orchestrator.admission import Admission, AimdLimiter, Unlimited
from orchestrator.cache import InvalidationFeed, LayeredCache, LocalTTLCache, NoCache, RecommendationCache
from orchestrator.config import Ablations, Settings
from orchestrator.errors import MissingSetting, Overloaded, UnknownKind, UnknownUser
from orchestrator.events import EventRecorder, invalidating
from orchestrator.fallback import Fallback, FallbackChain, PopularFallback, PrecomputedFallback, SessionFallback
from orchestrator.loop_lag import LoopLagMonitor
from orchestrator.naive import OneByOneBackend
from orchestrator.overload import OverloadHold
from orchestrator.popular import PopularLists
from orchestrator.ranking import Ranker, RankerUnavailable
from orchestrator.ranking.breaker import CircuitBreaker
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.ranking.triton_ranker import TritonRanker
from orchestrator.ratelimit import Limit, Limiter, Limiters, NoLimit, SharedLimiter
from orchestrator.readiness import Readiness
from orchestrator.recommender import DEPENDENCY_ERRORS, Recommender
from orchestrator.retrieval import FaissRetriever, Retriever
from orchestrator.store import EmbeddingStore, FeatureStore, PrecomputedStore, versions
from orchestrator.store.backend import Backend, is_tls
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.coalesce import CoalescingBackend
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.item_rows import LocalItemEmbeddings, LocalItemFeatures, LocalRows
from orchestrator.store.precomputed import RedisPrecomputedStore
from orchestrator.store.sharded import ShardedBackend
from orchestrator.store.versions import VersionInfo
from orchestrator.versioning import ModelVersion, VersionWatcher, version_path

log = logging.getLogger("orchestrator")

T = TypeVar("T")
BackendFactory = Callable[[Settings], Awaitable[Backend]]
RankerFactory = Callable[[Settings, VersionInfo], Awaitable[Ranker]]  # (settings, the model version)


# -- the tables ---------------------------------------------------------------------------------------


async def sharded_backend(settings: Settings) -> Backend:
    """Standalone servers on our hash ring; clients connect on first use."""
    redis = settings.redis
    return ShardedBackend.from_urls(redis.url_list, redis.timeout_ms, options=redis.connection)


async def cluster_backend(settings: Settings) -> Backend:
    """Redis Cluster, its topology discovered from the first URL."""
    redis = settings.redis
    return await ClusterBackend.connect(redis.url_list[0], redis.timeout_ms, redis.connection)


STORE_TOPOLOGIES: dict[str, BackendFactory] = {  # RECSERVE_REDIS_MODE
    "sharded": sharded_backend,
    "cluster": cluster_backend,
}


def pipelined_reads(backend: Backend) -> Backend:
    return backend


STORE_READS: dict[str, Callable[[Backend], Backend]] = {  # RECSERVE_ABLATION_STORE_READS
    "pipelined": pipelined_reads,
    "one_by_one": OneByOneBackend,  # the naive design the benchmarks compare against: one GET per round trip
}


async def triton_ranker(settings: Settings, version: VersionInfo) -> Ranker:
    triton = settings.triton
    if triton.url is None:
        raise MissingSetting("RECSERVE_TRITON_URL", "the triton ranker")
    breaker = CircuitBreaker(triton.breaker_failures, triton.breaker_reset_s)
    return TritonRanker(
        triton.url,
        triton.model,
        version.version,
        max_connection_age_s=triton.max_connection_age_s,
        breaker=breaker,
        # Several versions are served side by side (version_policy all): ask for this one's by number.
        triton_version=version.triton_version,
    )


async def onnx_ranker(settings: Settings, version: VersionInfo) -> Ranker:
    # Loading the model reads and optimises a file: off the event loop.
    path = version_path(settings.onnx.model_path, version.triton_version)
    return await asyncio.to_thread(OnnxRanker, path, version.version)


RANKERS: dict[str, RankerFactory] = {
    "triton": triton_ranker,
    "onnx": onnx_ranker,
}


def ranker_kind(settings: Settings) -> str:
    """Triton when its address is set (production); else ONNX Runtime in process (the embedded default)."""
    return "triton" if settings.triton.url else "onnx"


def choose(table: Mapping[str, T], kind: str, setting: str) -> T:
    """The table's entry for ``kind``; a kind it does not hold is an error naming the ones it does."""
    try:
        return table[kind]
    except KeyError:
        raise UnknownKind(setting, kind, table) from None


def check(settings: Settings, ablations: Ablations) -> None:
    """Looks up every choice the settings make, so that a kind no table holds stops the start at once."""
    choose(STORE_TOPOLOGIES, settings.redis.mode, "RECSERVE_REDIS_MODE")
    choose(STORE_READS, ablations.store_reads, "RECSERVE_ABLATION_STORE_READS")
    choose(RANKERS, ranker_kind(settings), "the ranker kind")


def fallback_chain(
    precomputed: PrecomputedStore, features: FeatureStore, popular: PopularLists, list_length: int = 100
) -> FallbackChain:
    """What answers when the real-time path cannot: the user's pre-computed list, then the popular list of
    their segment.

    Each fallback answers for the errors it declares; any other error is a bug and propagates. An unknown
    user (no embedding) has no pre-computed list either: items like those of their session answer for one
    (``list_length`` of them), else the popular list.
    """
    failures = (*DEPENDENCY_ERRORS, Overloaded)
    return FallbackChain(
        [
            Fallback(PrecomputedFallback(precomputed, features), catches=failures),
            Fallback(SessionFallback(list_length), catches=(UnknownUser,)),
            Fallback(PopularFallback(popular), catches=(*failures, UnknownUser)),
        ]
    )


def admission(settings: Settings, ablations: Ablations) -> Admission:
    """How many real-time computations run at once: AIMD within the configured bounds (orchestrator/admission.py
    says why), or no limit at all for the ablation that measures what it is worth."""
    if not ablations.admission_enabled:
        return Unlimited()
    limits, deadline = settings.admission, settings.deadline
    realtime_budget_s = (deadline.request_ms - deadline.fallback_reserve_ms) / 1000
    return AimdLimiter(
        limits.initial_limit,
        limits.min_limit,
        limits.max_limit,
        slow_s=limits.slow_percent / 100 * realtime_budget_s,
        backoff_ratio=limits.backoff_percent / 100,
    )


# -- the graph ----------------------------------------------------------------------------------------


@dataclass
class Services:
    """What the app serves from: built once per process, closed once."""

    settings: Settings
    backend: Backend
    pubsub: Redis
    retriever: Retriever
    ranker: Ranker
    popular: PopularLists
    recommender: Recommender
    events: EventRecorder
    limiters: Limiters
    catalogue: frozenset[str]  # the item ids of the index: an event's item is checked against it, O(1)
    tasks: list[asyncio.Task[None]]
    # Follows the active model version (orchestrator/versioning.py); on a switch, ``serve`` points retriever,
    # ranker and catalogue here at the new version's.
    versions: VersionWatcher | None = None

    def serve(self, version: ModelVersion) -> None:
        self.retriever, self.ranker, self.catalogue = version.retriever, version.ranker, version.catalogue

    async def readiness(self) -> dict[str, Readiness]:
        """Per part, what ``/readyz`` shows; each seam is asked the same question, concurrently."""
        redis, index, ranker = await asyncio.gather(self.backend.ready(), self.retriever.ready(), self.ranker.ready())
        popular = Readiness(True, "ok") if self.popular.loaded else Readiness(False, "not loaded")
        parts = {"redis": redis, "index": index, "ranker": ranker, "popular": popular}
        if self.versions is not None:
            parts["version"] = self.versions.readiness()
        return parts


async def build_services(settings: Settings, ablations: Ablations) -> Services:
    check(settings, ablations)
    backend = await choose(STORE_TOPOLOGIES, settings.redis.mode, "RECSERVE_REDIS_MODE")(settings)
    if ablations.redis_coalesce:
        backend = CoalescingBackend(backend)
    version = await versions.active(backend)
    reads = choose(STORE_READS, ablations.store_reads, "RECSERVE_ABLATION_STORE_READS")(backend)
    model = await build_version(settings, reads, backend, version)
    retriever, ranker = model.retriever, model.ranker
    urls, connection = settings.redis.url_list, settings.redis.connection
    # Pub/sub fans out cluster-wide, and in sharded mode every replica uses the same first shard.
    pubsub = Redis.from_url(urls[0], **connection.client_kwargs(is_tls(urls[0])))
    cache_settings = settings.cache
    local = LocalTTLCache(cache_settings.local_size if ablations.local_cache_enabled else 0, cache_settings.local_ttl_s)
    feed = InvalidationFeed(pubsub, local, cache_settings.invalidation_max_silence_s)
    cache: RecommendationCache = (
        LayeredCache(
            local,
            backend,
            pubsub,
            cache_settings.redis_ttl_s,
            local_trusted=feed.alive,
            generation_ttl_s=settings.events.user_state_ttl_s,
        )
        if ablations.cache_enabled
        else NoCache()
    )
    features = model.features
    precomputed = RedisPrecomputedStore(backend)
    popular = PopularLists(precomputed)
    await popular.refresh()
    loop_lag_ms = settings.overload.loop_lag_ms
    lag = LoopLagMonitor(loop_lag_ms / 1000) if loop_lag_ms > 0 else None
    recommender = Recommender(
        settings,
        cache,
        model.embeddings,
        features,
        retriever,
        ranker,
        fallback_chain(precomputed, features, popular, settings.ranking.list_length),
        # Held in the local layer, which only a cache that is on reads.
        OverloadHold(local, settings.overload.hold_s if ablations.cache_enabled else 0.0, settings.ranking.list_length),
        n_items=model.n_items,
        single_flight=ablations.single_flight_enabled,
        # With admission by capacity, a late loop does not send every miss to the fallback (the limiter keeps
        # some computing, so the cache refills); it then only says why a deadline was missed.
        overloaded=lag.overloaded if lag is not None and not ablations.admission_enabled else lambda: False,
        admission=admission(settings, ablations),
        loop_late=lag.overloaded if lag is not None else lambda: False,
    )
    recommender.swap(model)  # the same parts, with the version's own pre-computed lists and catalogue

    async def build_next(info: VersionInfo) -> ModelVersion:
        new = await build_version(settings, reads, backend, info)
        if settings.warmup.timeout_s > 0:
            timings = await recommender.warm_up(new.dim, settings.warmup.timeout_s, new)
            if "ranking" not in timings:
                await new.aclose()
                raise RankerUnavailable(f"model version {info.version}: the warm-up ranking failed")
        return new

    services_ref: list[Services] = []
    versions_settings = settings.versions
    watcher = VersionWatcher(
        backend,
        pubsub,
        recommender,
        build_next,
        on_swap=lambda new: services_ref[0].serve(new) if services_ref else None,
        poll_s=versions_settings.poll_s,
        claim_ttl_s=versions_settings.claim_ttl_s,
        drain_s=versions_settings.drain_s,
        behind_max_s=versions_settings.behind_max_s,
    )
    tasks = [
        asyncio.create_task(feed.run()),
        asyncio.create_task(popular.refresh_forever(settings.popular.refresh_s)),
    ]
    if lag is not None:
        tasks.append(asyncio.create_task(lag.run()))
    tasks.append(asyncio.create_task(watcher.run()))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            await feed.subscribed.wait()
    if settings.warmup.timeout_s > 0:
        timings = await recommender.warm_up(model.dim, settings.warmup.timeout_s)
        log.info("warm-up before serving: %s", ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()) or "nothing")
    services = Services(
        settings,
        backend,
        pubsub,
        retriever,
        ranker,
        popular,
        recommender,
        EventRecorder(
            backend,
            # Events touch only unversioned keys (sessions, seen sets): any version's view writes the same.
            RedisFeatureStore(backend, version.version),
            cache,
            user_state_ttl_s=settings.events.user_state_ttl_s,
            event_id_ttl_s=settings.events.event_id_ttl_s,
            invalidate_on=invalidating(settings.session.max_events > 0),
        ),
        limiters(settings, backend),
        model.catalogue,
        tasks,
        watcher,
    )
    services_ref.append(services)
    return services


async def build_version(settings: Settings, reads: Backend, backend: Backend, info: VersionInfo) -> ModelVersion:
    """One model version's parts: its index and ranker (loaded off the event loop) and its store views."""
    index_path = version_path(settings.index.path, info.triton_version)
    retriever = await asyncio.to_thread(FaissRetriever, index_path, settings.index.inline_max_ms / 1000)
    log.info(
        "model version %s: FAISS search takes %.3f ms: run %s",
        info.version,
        retriever.search_s * 1000,
        "on the event loop" if retriever.inline else "in a thread",
    )
    if retriever.manifest.model_version != info.version:
        log.warning(
            "index %s is of model version %s, not of the active Redis version %s",
            index_path,
            retriever.manifest.model_version,
            info.version,
        )
    try:
        ranker = await choose(RANKERS, ranker_kind(settings), "the ranker kind")(settings, info)
    except BaseException:
        await retriever.aclose()
        raise
    embeddings: EmbeddingStore = RedisEmbeddingStore(reads, info)
    features: FeatureStore = RedisFeatureStore(reads, info.version)
    kept, ttl_s = settings.cache.item_rows, settings.cache.item_rows_ttl_s
    if kept:
        embeddings = LocalItemEmbeddings(embeddings, LocalRows(kept, ttl_s, "item_embeddings"))
        features = LocalItemFeatures(features, LocalRows(kept, ttl_s, "item_features"))
    return ModelVersion(
        info.version,
        retriever,
        ranker,
        embeddings,
        features,
        RedisPrecomputedStore(backend, info.version),
        n_items=len(retriever.item_ids),
        catalogue=frozenset(retriever.item_ids),
        triton_version=info.triton_version,
        dim=retriever.manifest.dim,
    )


def limiters(settings: Settings, backend: Backend) -> Limiters:
    """Per-caller limits shared by every replica (a token bucket in Redis); the read limit only if set."""
    writes = Limit(settings.events.rate_per_s, settings.events.burst)
    reads = Limit(settings.reads.rate_per_s, settings.reads.burst)
    read_limiter: Limiter = SharedLimiter(backend, "r", reads) if reads.rate_per_s > 0 else NoLimit()
    return Limiters(SharedLimiter(backend, "w", writes), read_limiter, writes, reads)


async def close_services(services: Services) -> None:
    for task in services.tasks:
        task.cancel()
    await asyncio.gather(*services.tasks, return_exceptions=True)
    await services.recommender.drain()
    if services.versions is not None:
        await services.versions.aclose()  # versions still draining after a switch, and this replica's claims
    # The request path's parts first (the ranker lets calls in flight finish), then the channel and the store.
    for part in (services.ranker, services.retriever, services.pubsub, services.backend):
        await part.aclose()
