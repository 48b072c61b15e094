"""The request flow, in the order of the diagram in DESIGN.md:

    cache (local -> Redis; an event of the user's drops their lists, orchestrator/events.py)
      miss -> single-flight per (user, context): join the computation under way, or start one if the
              admission limiter (orchestrator/admission.py) has a slot; none free: the fallback at once (shed)
        user embedding + features + seen set + last session events (Redis, one round trip: one hash tag)
        -> session: the touched items' embeddings (Redis, per shard; only with events in the window)
           -> query = the user's embedding blended with their weighted mean (orchestrator/session.py)
        -> FAISS candidates for the query (on the event loop when short, else a thread)
        -> candidate embeddings + features (those of hot items held in process, the rest Redis, per shard)
        -> ranking of the query against them (Triton over gRPC, within what is left of the deadline)
        -> exclude seen/purchased -> top N, the session's share of places to the candidates nearest it
           (orchestrator/session.py interleave) -> cache write
      shed, deadline missed, a part down or the process overloaded -> pre-computed list (Redis)
                                                                   -> the segment's popular list (memory)
      no embedding (unknown user) -> items nearest their session (FAISS) -> the segment's popular list

What answers when the real-time path cannot is the fallback chain the recommender is given
(``orchestrator/fallback.py``, built by the composition root): its fallbacks catch the errors they declare
only; anything else is a bug and propagates. An answer given because this process was overloaded is held
for a moment by ``orchestrator/overload.py``, which the flow asks after every fallback.

The budget travels with the work: the computation runs under the request's real-time deadline, so every
Redis read waits at most what is left of it (the command itself is left to finish, see
``orchestrator/store/backend.py``), and the ranker is given what is left as its timeout (Triton gets it
as its gRPC deadline's base and as the request's queue timeout). A computation no request waits for any
more stops at its next stage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from orchestrator import metrics, schema, session, telemetry
from orchestrator.admission import Admission, Permit, Unlimited
from orchestrator.cache import UNKNOWN_GENERATION, CachedList, RecommendationCache
from orchestrator.config import Settings
from orchestrator.errors import ComputationAbandoned, LoopLate, Overloaded, Shed, UnknownUser, UserRead
from orchestrator.fallback import FallbackChain, FallbackRequest
from orchestrator.overload import HoldSlot, OverloadHold
from orchestrator.ranking import Ranker, RankerUnavailable, RankingRequest
from orchestrator.retrieval import Retriever
from orchestrator.singleflight import SingleFlight
from orchestrator.store import EmbeddingStore, FeatureStore, SessionEvent
from orchestrator.store.errors import StoreUnavailable
from orchestrator.versioning import ModelVersion

log = logging.getLogger(__name__)

# What a dependency raises when it cannot answer in time: a cache lookup that fails is a miss, a failed
# warm-up stage stays cold, and the fallback chain (orchestrator/composition.py) answers for these.
DEPENDENCY_ERRORS = (TimeoutError, StoreUnavailable, RankerUnavailable)
# How a computation ends when it ran out of time (after ``Recommender._attributed``): the admission limiter
# backs off on these. A dependency that is down says nothing about this process's capacity.
MISSED_ERRORS = (TimeoutError, LoopLate)


CONTEXT_FIELDS: tuple[str, ...] = ("page_type", "device")
# Answers whose scores are the ranker's (a sigmoid): their top score is comparable across versions. Popular
# lists carry counts and session answers retrieval scores, on other scales.
RANKED_SOURCES = frozenset({"realtime", "cache", "precomputed"})


@dataclass(frozen=True)
class RequestContext:
    """The allow-listed context of a request: the only fields that change the ranking (and the cache key)."""

    page_type: str = "home"
    device: str = "web"

    @classmethod
    def from_query(cls, params: Mapping[str, object]) -> RequestContext:
        """Reads the allow-listed fields only: whatever else a client sends (tracking ids, timestamps)
        can neither split the cache nor change the ranking. Values must be known ones (ValueError)."""
        values = {name: str(params[name]) for name in CONTEXT_FIELDS if name in params}
        for name, known in (("page_type", schema.PAGE_TYPES[1:]), ("device", schema.DEVICES[1:])):
            if name in values and values[name] not in known:
                raise ValueError(f"{name} must be one of {list(known)}, got {values[name]!r}")
        return cls(**values)

    @property
    def cache_key(self) -> str:
        return f"{self.page_type}|{self.device}"

    def features(self) -> np.ndarray:
        return np.asarray(
            [
                schema.context_index(schema.PAGE_TYPES, self.page_type),
                schema.context_index(schema.DEVICES, self.device),
            ],
            dtype=np.int64,
        )


@dataclass
class Recommendation:
    user_id: str
    items: list[tuple[str, float]]
    source: str  # cache | realtime | precomputed | session | popular
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    fallback_reason: str | None = None
    arm: str = "active"  # "canary" when a canary version served it (orchestrator/versioning.py)
    segment: str | None = None  # the popular list's segment (source popular)


def user_bucket(user_id: str) -> int:
    """0..99, stable across processes and restarts (blake2b, not ``hash()``): a user's canary arm."""
    return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "big") % 100


class StageTimer:
    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            with telemetry.stage_span(name):  # a shared no-op while tracing is off
                yield
        finally:
            elapsed = time.perf_counter() - started
            self.timings_ms[name] = round(elapsed * 1000, 3)
            metrics.STAGE_LATENCY.labels(name).observe(elapsed)


@dataclass
class Computed:
    value: CachedList
    timings_ms: dict[str, float]


class Recommender:
    def __init__(
        self,
        settings: Settings,
        cache: RecommendationCache,
        embeddings: EmbeddingStore,
        features: FeatureStore,
        retriever: Retriever,
        ranker: Ranker,
        fallbacks: FallbackChain,
        hold: OverloadHold,
        n_items: int,
        single_flight: bool = True,
        overloaded: Callable[[], bool] = lambda: False,
        admission: Admission | None = None,
        loop_late: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.cache = cache
        # The model version every request serves from: one immutable object, swapped whole (``swap``) when
        # the active version moves (orchestrator/versioning.py); a request takes it once, at its start.
        self._current = ModelVersion(ranker.model_version, retriever, ranker, embeddings, features, None, n_items)
        self._canary: tuple[ModelVersion, int] | None = None  # (version, percent of users)
        self.fallbacks = fallbacks  # orchestrator/fallback.py: pre-computed, then popular
        self.hold = hold  # orchestrator/overload.py
        self.single_flight: SingleFlight[Computed] | None = SingleFlight() if single_flight else None
        # While true, every miss answers from the fallback (orchestrator/loop_lag.py): the behaviour without
        # admission by capacity; with it, the composition root passes a signal that is never true.
        self.overloaded = overloaded
        self.admission: Admission = admission if admission is not None else Unlimited()  # orchestrator/admission.py
        self.loop_late = loop_late  # orchestrator/loop_lag.py: tells a late loop from a slow dependency
        self._background: set[asyncio.Task[None]] = set()

    @property
    def current(self) -> ModelVersion:
        return self._current

    @property
    def canary(self) -> tuple[ModelVersion, int] | None:
        return self._canary

    def set_canary(self, canary: tuple[ModelVersion, int] | None) -> tuple[ModelVersion, int] | None:
        """Serve ``percent`` % of users from a canary version from the next request on (None: nobody)."""
        old, self._canary = self._canary, canary
        return old

    def pick(self, user_id: str) -> tuple[ModelVersion, str]:
        """The version (and arm) that serves ``user_id``: the canary for its share of users, by a stable hash
        of the id (the same user always lands in the same arm, on every replica), else the active one."""
        canary = self._canary
        if canary is not None and user_bucket(user_id) < canary[1]:
            return canary[0], "canary"
        return self._current, "active"

    def swap(self, new: ModelVersion) -> ModelVersion:
        """Serve ``new`` from the next request on (requests under way finish on theirs); returns the old one."""
        old, self._current = self._current, new
        return old

    # The current version's parts (tests replace the retriever: a new ModelVersion each time).
    @property
    def model_version(self) -> str:
        return self._current.version

    @property
    def embeddings(self) -> EmbeddingStore:
        return self._current.embeddings

    @property
    def features(self) -> FeatureStore:
        return self._current.features

    @property
    def retriever(self) -> Retriever:
        return self._current.retriever

    @retriever.setter
    def retriever(self, value: Retriever) -> None:
        self._current = replace(self._current, retriever=value)

    @property
    def ranker(self) -> Ranker:
        return self._current.ranker

    @property
    def n_items(self) -> int:
        return self._current.n_items

    async def warm_up(self, dim: int, timeout_s: float, version: ModelVersion | None = None) -> dict[str, float]:
        """One pass over the compute path with a zero user vector before the first request: a fresh process
        opens its Redis connections and the Triton channel and runs the index and the model for the first
        time here, not past a user's deadline. Milliseconds per stage that succeeded; a stage that fails is
        logged and left cold (requests then fall back, as they would have anyway). ``version``: a version
        about to be swapped in (default: the current one)."""
        mv = version or self._current
        n = min(self.settings.ranking.n_candidates, mv.n_items)
        candidates: list[str] = []

        async def retrieval() -> None:
            found, _ = await mv.retriever.search(np.zeros((1, dim), dtype=np.float32), n)
            candidates.extend(found[0])

        async def item_features() -> None:
            await asyncio.gather(mv.embeddings.get_batch("item", candidates), mv.features.get_rows("item", candidates))

        async def ranking() -> None:
            request = RankingRequest(
                user_embedding=np.zeros(dim, dtype=np.float32),
                user_features=np.zeros(len(schema.USER_FEATURES), dtype=np.int64),
                item_embeddings=np.zeros((n, dim), dtype=np.float32),
                item_features=np.zeros((n, len(schema.ITEM_FEATURES)), dtype=np.int64),
                context_features=np.zeros(len(schema.CONTEXT_FEATURES), dtype=np.int64),
            )
            await mv.ranker.score(request, timeout_s=timeout_s)

        stages: dict[str, Callable[[], Awaitable[None]]] = {
            "retrieval": retrieval,
            "item_features": item_features,
            "ranking": ranking,
        }
        timings: dict[str, float] = {}
        for stage, run in stages.items():
            if stage == "item_features" and not candidates:
                log.warning("warm-up: item_features skipped, retrieval gave no candidates")
                continue
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    await run()
            except DEPENDENCY_ERRORS as exc:
                log.warning(
                    "warm-up: %s failed (%s: %s); the first requests may fall back", stage, type(exc).__name__, exc
                )
                continue
            timings[stage] = round((time.perf_counter() - started) * 1000, 3)
        return timings

    async def recommend(self, user_id: str, n: int, context: RequestContext) -> Recommendation:
        mv, arm = self.pick(user_id)  # the one model version this request serves from, whatever switches meanwhile
        started = time.perf_counter()
        answer = await self._recommend(mv, user_id, n, context)
        metrics.VERSION_LATENCY.labels(mv.version).observe(time.perf_counter() - started)
        metrics.VERSION_ANSWERS.labels(mv.version, answer.source).inc()
        if answer.source in RANKED_SOURCES and answer.items:
            metrics.VERSION_TOP_SCORE.labels(mv.version).observe(answer.items[0][1])
        answer.arm = arm
        return answer

    async def _recommend(self, mv: ModelVersion, user_id: str, n: int, context: RequestContext) -> Recommendation:
        started = time.perf_counter()
        deadline = started + self.settings.deadline.request_ms / 1000
        realtime_budget_s = (self.settings.deadline.request_ms - self.settings.deadline.fallback_reserve_ms) / 1000
        timer = StageTimer()
        # Cached lists are per model version: after a switch the old version's lists are not served as the new
        # one's, and are not dropped either (they expire; misses refill the cache under the new version).
        cache_key = f"{mv.version}|{context.cache_key}"
        with timer.stage("cache"):
            try:
                async with asyncio.timeout(realtime_budget_s):
                    lookup = await self.cache.get(user_id, cache_key)
            except DEPENDENCY_ERRORS:
                lookup = None
        if lookup is not None and lookup.value is not None:
            return self._answer(user_id, lookup.value, n, "cache", timer.timings_ms)
        generation = lookup.generation if lookup is not None else UNKNOWN_GENERATION
        remaining_s = realtime_budget_s - (time.perf_counter() - started)
        slot = HoldSlot(cache_key, generation)
        starved = remaining_s * 1000 < self.settings.deadline.min_compute_ms
        if starved or self.overloaded():
            # The cache lookup alone ate the budget, or the event loop runs late: the process is saturated.
            # Computing now would only add load and still miss the deadline, so answer from the fallback at once.
            why = "the cache lookup past the budget" if starved else "an event loop that runs late"
            return await self._fallback(mv, user_id, n, Overloaded(why), deadline, timer, slot)
        key = f"{user_id}|{cache_key}"
        flight = self.single_flight
        permit: Permit | None = None
        if flight is None or not flight.running(key):  # joining a computation under way costs no slot
            permit = self.admission.try_acquire()
            if permit is None:
                # Past the capacity: the pre-computed list now (one round trip, then held for the user's next
                # requests), instead of a computation that would only make every other one late too.
                return await self._fallback(mv, user_id, n, Shed(), deadline, timer, slot)
        realtime_deadline = started + realtime_budget_s
        try:
            async with asyncio.timeout(max(remaining_s, 0.0)):
                if flight is None:
                    assert permit is not None
                    computed = await self._compute(mv, user_id, context, generation, realtime_deadline, permit)
                    joined = False
                else:
                    work = lambda: self._compute(  # noqa: E731
                        mv, user_id, context, generation, realtime_deadline, permit, lambda: flight.wanted(key)
                    )
                    computed, joined = await flight.do(key, work)
        except self.fallbacks.catches as exc:
            return await self._fallback(mv, user_id, n, self._attributed(exc), deadline, timer, slot)
        if joined:
            metrics.SINGLE_FLIGHT_JOINS.inc()
        timer.timings_ms.update(computed.timings_ms)
        return self._answer(user_id, computed.value, n, "realtime", timer.timings_ms)

    async def _compute(
        self,
        mv: ModelVersion,
        user_id: str,
        context: RequestContext,
        generation: int,
        realtime_deadline: float,
        permit: Permit | None,
        wanted: Callable[[], bool] = lambda: True,
    ) -> Computed:
        """The computation under its permit (None: never, the flow starts none without one; typed so for the
        single-flight work, which only a caller holding one starts), which learns how it ended."""
        if permit is None:
            raise RuntimeError("expected a computation slot for a new computation, but found none")
        outcome = permit.ignored  # cancelled, abandoned, or a dependency down: nothing about capacity
        try:
            # The computation runs as its own task (single-flight), so a caller's deadline does not stop it;
            # its own does. Work past it would be thrown away, and under overload that waste is what keeps the
            # process overloaded: every late computation delays the next ones past their deadlines too.
            async with asyncio.timeout(max(realtime_deadline - time.perf_counter(), 0.0)):
                computed = await self._compute_stages(mv, user_id, context, generation, realtime_deadline, wanted)
            outcome = permit.succeeded
            return computed
        except asyncio.CancelledError:
            # Without single-flight the caller's own deadline (the same instant) may end it first.
            if time.perf_counter() >= realtime_deadline:
                outcome = permit.missed
            raise
        except Exception as exc:
            error = self._attributed(exc)
            if isinstance(error, MISSED_ERRORS):
                outcome = permit.missed
            if error is exc:
                raise
            raise error from exc
        finally:
            outcome()

    def _attributed(self, error: Exception) -> Exception:
        """The error that says what happened. A deadline missed while the event loop ran late (a read past
        its per-shard deadline, or the computation past its own) is this process's backlog, ``loop_late``:
        not a slow dependency (``deadline``) nor a shard that did not answer (``store_unavailable``, which a
        refused or failed read still is, however late the loop)."""
        if isinstance(error, LoopLate):
            return error
        late_read = isinstance(error, StoreUnavailable) and error.only_timed_out
        if not (late_read or isinstance(error, TimeoutError)) or not self.loop_late():
            return error
        late = LoopLate("a store read past its deadline" if late_read else "the computation past its deadline")
        late.__cause__ = error
        return late

    async def _compute_stages(
        self,
        mv: ModelVersion,
        user_id: str,
        context: RequestContext,
        generation: int,
        realtime_deadline: float,
        wanted: Callable[[], bool],
    ) -> Computed:
        def next_stage(stage: str) -> None:
            # Every request that waited for this computation has its answer (a fallback) or has gone: the
            # rest of the work would be for nobody. A request still waiting (a single-flight follower) keeps it.
            if not wanted():
                raise ComputationAbandoned(stage)

        timer = StageTimer()
        next_stage("user_features")
        with timer.stage("user_features"):
            # One round trip: the session list shares the user's hash tag (orchestrator/store/keys.py), so the
            # coalescing backend sends these four reads in one pipeline to one shard.
            user_vectors, user_rows, seen_sets, events = await asyncio.gather(
                mv.embeddings.get_batch("user", [user_id]),
                mv.features.get_rows("user", [user_id]),
                mv.features.seen([user_id]),
                self._recent_events(mv, user_id),
            )
        if user_vectors.unavailable[0] or seen_sets[0] is None:
            raise StoreUnavailable(f"user {user_id}", user_vectors.down or ("seen",), user_vectors.timed_out)
        if not user_rows.found[0]:
            metrics.MISSING_FEATURES.labels("user").inc()  # defaulted to the "unknown" index 0
        seen = seen_sets[0]

        touched = self._touched(events)
        session_vector = None
        if touched:
            next_stage("session")
            with timer.stage("session"):
                session_vector = await self._session_vector(mv, touched)
        if not user_vectors.found[0]:
            found_row = bool(user_rows.found[0])
            segment = schema.user_segment(int(user_rows.matrix[0, 0])) if found_row else schema.GLOBAL_SEGMENT
            raise UnknownUser(user_id, UserRead(segment, frozenset(seen), session_vector, frozenset(touched)))
        # The session moves the query for retrieval and ranking alike: the ranker is given it as the user's
        # embedding (its contract unchanged; docs/SESSION.md says why it takes no session features).
        query = session.blend_query(user_vectors.matrix[0], session_vector, self.settings.session.alpha)
        assert query is not None  # the user's vector was found

        next_stage("retrieval")
        with timer.stage("retrieval"):
            k = min(mv.n_items, self.settings.ranking.n_candidates + len(seen))
            found_ids, _ = await mv.retriever.search(query[None, :], k)
            candidates = [i for i in found_ids[0] if i not in seen][: self.settings.ranking.n_candidates]

        next_stage("item_features")
        with timer.stage("item_features"):
            item_vectors, item_rows = await asyncio.gather(
                mv.embeddings.get_batch("item", candidates), mv.features.get_rows("item", candidates)
            )
        usable = item_vectors.found
        if not usable.all():
            metrics.MISSING_FEATURES.labels("item_embedding").inc(int((~usable).sum()))
        if not item_rows.found[usable].all():
            metrics.MISSING_FEATURES.labels("item").inc(int((~item_rows.found[usable]).sum()))
        kept = [c for c, ok in zip(candidates, usable.tolist(), strict=True) if ok]
        if not kept:
            raise StoreUnavailable(
                "candidate embeddings", item_vectors.down or ("no candidate found",), item_vectors.timed_out
            )

        next_stage("ranking")
        with timer.stage("ranking"):
            request = RankingRequest(
                user_embedding=query,
                user_features=user_rows.matrix[0],
                item_embeddings=item_vectors.matrix[usable],
                item_features=item_rows.matrix[usable],
                context_features=context.features(),
            )
            timeout_s = realtime_deadline - time.perf_counter()
            if timeout_s <= 0:
                raise TimeoutError("no time left to rank")
            scores = await mv.ranker.score(request, timeout_s=timeout_s)

        length = self.settings.ranking.list_length
        ranked: list[int] = np.argsort(-scores, kind="stable").tolist()
        order = ranked[:length]
        if session_vector is not None:
            # A share of the places to the candidates nearest the session: the ranker takes no session features,
            # and one that scores mostly by item would rank what the session asks for out of sight again.
            nearness = item_vectors.matrix[usable] @ session_vector.astype(np.float32)
            nearest = [i for i in np.argsort(-nearness, kind="stable").tolist() if kept[i] not in touched]
            order = session.interleave(ranked, nearest, self.settings.session.alpha, length)
        value = CachedList(
            tuple(kept[i] for i in order), tuple(float(scores[i]) for i in order), mv.version, generation
        )
        self._in_background(self.cache.set(user_id, f"{mv.version}|{context.cache_key}", value))
        return Computed(value, timer.timings_ms)

    async def _recent_events(self, mv: ModelVersion, user_id: str) -> list[SessionEvent]:
        limit = self.settings.session.max_events
        return await mv.features.recent_events(user_id, limit) if limit > 0 else []

    def _touched(self, events: list[SessionEvent]) -> dict[str, float]:
        """Each item of the session's events with the sum of their weights (kind, age; orchestrator/session.py):
        only those within the window and of a kind the session weighs."""
        settings = self.settings.session
        weights = session.event_weights(
            [(event.event, event.ts_ms) for event in events],
            int(time.time() * 1000),  # the clock the events were stamped with (orchestrator/events.py)
            settings.window_s,
            settings.half_life_s,
        )
        touched: dict[str, float] = {}
        for event, weight in zip(events, weights.tolist(), strict=True):
            if weight > 0:
                touched[event.item_id] = touched.get(event.item_id, 0.0) + weight
        return touched

    async def _session_vector(self, mv: ModelVersion, touched: dict[str, float]) -> np.ndarray | None:
        """The weighted mean of the touched items' embeddings. Best effort: an item the store does not hold
        (or whose shard does not answer) is left out, and the session with it if none is left; the request
        never fails for its session."""
        vectors = await mv.embeddings.get_batch("item", list(touched))
        weights = np.fromiter(touched.values(), dtype=np.float64, count=len(touched))
        if not vectors.found.all():
            metrics.MISSING_FEATURES.labels("session_item").inc(int((~vectors.found).sum()))
        return session.session_vector(vectors.matrix[vectors.found], weights[vectors.found])

    async def _fallback(
        self,
        mv: ModelVersion,
        user_id: str,
        n: int,
        cause: Exception,
        deadline: float,
        timer: StageTimer,
        slot: HoldSlot,
    ) -> Recommendation:
        request = FallbackRequest(
            user_id,
            deadline,
            timer,
            precomputed=mv.precomputed,
            read=cause.read if isinstance(cause, UnknownUser) else None,
            features=mv.features,
            retriever=mv.retriever,
            model_version=mv.version,
        )
        answer = await self.fallbacks.answer(cause, request)
        self.hold.keep(user_id, slot, answer)
        return Recommendation(
            user_id,
            answer.items[:n],
            answer.source,
            answer.model_version,
            timer.timings_ms,
            answer.reason,
            segment=answer.segment,
        )

    def _answer(
        self, user_id: str, value: CachedList, n: int, source: str, timings: dict[str, float]
    ) -> Recommendation:
        items = list(zip(value.items[:n], value.scores[:n], strict=True))
        if value.fallback_reason is not None:  # a held fallback: it says what it is, wherever it came from
            metrics.FALLBACKS.labels(value.fallback_reason).inc()
            return Recommendation(
                user_id, items, value.source, value.model_version, timings, value.fallback_reason, segment=value.segment
            )
        return Recommendation(user_id, items, source, value.model_version, timings)

    def _in_background(self, coroutine: object) -> None:
        """Cache writes do not hold up the answer; failures are logged, never raised to the client."""

        async def guarded() -> None:
            try:
                await coroutine  # type: ignore[misc]
            except DEPENDENCY_ERRORS as exc:
                log.debug("cache write skipped: %s", exc)

        task = asyncio.ensure_future(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background cache writes (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
