"""The request flow with in-process fakes of our own Protocols (no patched library internals)."""

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from orchestrator import schema
from orchestrator.admission import AimdLimiter
from orchestrator.cache import CachedList, CacheLookup
from orchestrator.composition import fallback_chain
from orchestrator.config import DeadlineSettings, RankingSettings, Settings
from orchestrator.loop_lag import LoopLagMonitor
from orchestrator.overload import OverloadHold
from orchestrator.popular import PopularLists
from orchestrator.ranking import RankerUnavailable, RankingRequest
from orchestrator.readiness import Readiness
from orchestrator.recommender import Recommender, RequestContext
from orchestrator.store import Lookup, Recommendations, SessionEvent, keys
from orchestrator.store.backend import Command, Replies
from orchestrator.store.coalesce import CoalescingBackend
from orchestrator.store.errors import StoreUnavailable
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.precomputed import RedisPrecomputedStore
from orchestrator.store.precomputed import encode as encode_recs
from tests.waiting import until

DIM = 4
ITEMS = [str(i) for i in range(1, 11)]


class FakeEmbeddings:
    def __init__(self, down: bool = False, timed_out: bool = False) -> None:
        rng = np.random.default_rng(0)
        self.vectors = {f"user:{u}": rng.normal(size=DIM).astype(np.float32) for u in ("1", "2", "3")}
        self.vectors |= {f"item:{i}": rng.normal(size=DIM).astype(np.float32) for i in ITEMS}
        self.down = down
        self.timed_out = timed_out  # the shard missed its deadline, rather than refusing

    async def get_batch(self, kind: str, ids: Sequence[str]) -> Lookup:
        n = len(ids)
        if self.down:
            late = ("shard-0",) if self.timed_out else ()
            return Lookup(
                np.full((n, DIM), np.nan, np.float32), np.zeros(n, bool), np.ones(n, bool), ("shard-0",), late
            )
        rows = [self.vectors.get(f"{kind}:{i}") for i in ids]
        found = np.array([r is not None for r in rows], dtype=bool)
        matrix = np.stack([r if r is not None else np.full(DIM, np.nan, np.float32) for r in rows])
        return Lookup(matrix, found, np.zeros(n, bool))

    async def set_batch(self, kind: str, ids: Sequence[str], matrix: np.ndarray) -> None:
        raise NotImplementedError


class FakeFeatures:
    def __init__(self, seen: set[str] | None = None) -> None:
        self._seen = seen or set()

    async def get_rows(self, kind: str, ids: Sequence[str]) -> Lookup:
        width = len(schema.USER_FEATURES if kind == "user" else schema.ITEM_FEATURES)
        n = len(ids)
        return Lookup(np.ones((n, width), np.int64), np.ones(n, bool), np.zeros(n, bool))

    async def set_rows(self, kind: str, ids: Sequence[str], rows: np.ndarray) -> None: ...

    async def recent_events(self, user_id: str, limit: int) -> list[SessionEvent]:
        return []

    async def add_event(self, user_id: str, event: SessionEvent) -> None: ...

    async def seen(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        return [set(self._seen) for _ in user_ids]

    async def add_seen(self, seen: Mapping[str, Sequence[str]], ttl_s: int | None = None) -> None: ...


class FakeRetriever:
    async def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        return [ITEMS[:k]], np.zeros((1, k), np.float32)

    async def ready(self) -> Readiness:
        return Readiness(True, "ok")

    async def aclose(self) -> None: ...


class FakeRanker:
    """Scores by reverse retrieval order; or waits on ``gate`` forever; or fails."""

    model_version = "v-test"

    def __init__(self, gate: asyncio.Event | None = None, error: BaseException | None = None) -> None:
        self.gate = gate
        self.error = error
        self.calls = 0
        self.sizes: list[int] = []
        self.budgets: list[float | None] = []
        self.entered = asyncio.Event()

    async def score(self, request: RankingRequest, timeout_s: float | None = None) -> np.ndarray:
        self.calls += 1
        self.sizes.append(request.n_candidates)
        self.budgets.append(timeout_s)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return np.arange(request.n_candidates, dtype=np.float32)

    async def ready(self) -> Readiness:
        return Readiness(True, "ok")

    async def aclose(self) -> None: ...


class FakePrecomputed:
    def __init__(self, lists: dict[str, Recommendations]) -> None:
        self.lists = lists

    async def get_recs(self, user_ids: Sequence[str]) -> list[Recommendations | None]:
        return [self.lists.get(u) for u in user_ids]

    async def set_recs(self, recs: Mapping[str, Recommendations], ttl_s: int) -> None: ...

    async def get_popular(self, segment: str) -> Recommendations | None:
        if segment == schema.GLOBAL_SEGMENT:
            return Recommendations(("9", "8", "7"), (3.0, 2.0, 1.0), "v-pop", 0.0)
        return None

    async def set_popular(self, segment: str, recs: Recommendations) -> None: ...


class FakeCache:
    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], CachedList] = {}

    async def get(self, user_id: str, context_key: str) -> CacheLookup:
        value = self.stored.get((user_id, context_key))
        return CacheLookup(value, "local" if value else None, 0)

    async def set(self, user_id: str, context_key: str, value: CachedList) -> None:
        self.stored[(user_id, context_key)] = value

    async def invalidate(self, user_id: str) -> None:
        self.stored = {k: v for k, v in self.stored.items() if k[0] != user_id}


class HeldInFakeCache:
    """The local layer the overload hold writes to: here, the fake cache's own lists."""

    def __init__(self, cache: FakeCache) -> None:
        self.cache = cache

    def set(self, user_id: str, context_key: str, value: CachedList, ttl_s: float | None = None) -> bool:
        self.cache.stored[(user_id, context_key)] = value  # the ttl is LocalTTLCache's to honour (tested there)
        return True


def small_settings(request_ms: float, min_compute_ms: float = 20.0) -> Settings:
    """A small budget (20 ms of it kept for the fallback), 8 candidates ranked, 5 kept."""
    return Settings(
        deadline=DeadlineSettings(request_ms=request_ms, fallback_reserve_ms=20, min_compute_ms=min_compute_ms),
        ranking=RankingSettings(n_candidates=8, list_length=5),
    )


PRECOMPUTED = {"1": Recommendations(("5", "6", "7"), (0.9, 0.8, 0.7), "v-old", 0.0)}


async def make(
    ranker: FakeRanker, embeddings: FakeEmbeddings | None = None, seen: set[str] | None = None
) -> Recommender:
    precomputed = FakePrecomputed(PRECOMPUTED)
    popular = PopularLists(precomputed)
    await popular.refresh()
    settings = small_settings(request_ms=50)
    cache, features = FakeCache(), FakeFeatures(seen)
    return Recommender(
        settings,
        cache,
        embeddings or FakeEmbeddings(),
        features,
        FakeRetriever(),
        ranker,
        fallback_chain(precomputed, features, popular),
        OverloadHold(HeldInFakeCache(cache), settings.overload.hold_s, settings.ranking.list_length),
        n_items=len(ITEMS),
    )


async def test_realtime_ranks_then_serves_from_cache() -> None:
    ranker = FakeRanker()
    recommender = await make(ranker, seen={"1"})
    first = await recommender.recommend("1", 3, RequestContext())
    await recommender.drain()
    second = await recommender.recommend("1", 3, RequestContext())
    assert first.source == "realtime" and second.source == "cache"
    # candidates 2..9 (seen "1" dropped, 8 candidates), best = last by the fake's scores
    assert [i for i, _ in first.items] == ["9", "8", "7"]
    assert first.items == second.items and ranker.calls == 1


async def test_a_ranker_past_the_deadline_falls_back_to_precomputed_in_time() -> None:
    recommender = await make(FakeRanker(gate=asyncio.Event()))  # never released
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "precomputed" and answer.fallback_reason == "deadline"
    assert [i for i, _ in answer.items] == ["5", "6", "7"]
    assert loop.time() - started < 0.05 + 0.02  # the 50 ms deadline, plus scheduling


class GatedRetriever(FakeRetriever):
    """Answers only once ``gate`` is set: a retrieval as slow as the test says."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        self.entered.set()
        await self.gate.wait()
        return await super().search(user_vectors, k)


class CountingEmbeddings(FakeEmbeddings):
    def __init__(self) -> None:
        super().__init__()
        self.item_reads = 0

    async def get_batch(self, kind: str, ids: Sequence[str]) -> Lookup:
        self.item_reads += kind == "item"
        return await super().get_batch(kind, ids)


async def test_a_computation_past_its_deadline_stops_instead_of_working_on_for_nobody() -> None:
    embeddings = CountingEmbeddings()
    recommender = await make(FakeRanker(), embeddings=embeddings)
    recommender.retriever = retriever = GatedRetriever()
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "precomputed" and answer.fallback_reason == "deadline"
    retriever.gate.set()  # the retrieval returns now, after the 30 ms real-time budget
    flight = recommender.single_flight
    assert flight is not None
    await until(lambda: flight.in_flight == 0, 1, "the computation over, cancelled or finished")
    # Under overload such late work (reads of every candidate, a ranking) is what delays the next requests.
    assert embeddings.item_reads == 0


async def test_an_unavailable_ranker_falls_back_and_says_why() -> None:
    recommender = await make(FakeRanker(error=RankerUnavailable("triton down")))
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "precomputed" and answer.fallback_reason == "ranker_unavailable"


async def test_precomputed_fallback_drops_items_bought_since() -> None:
    recommender = await make(FakeRanker(error=RankerUnavailable("down")), seen={"5"})
    answer = await recommender.recommend("1", 3, RequestContext())
    assert [i for i, _ in answer.items] == ["6", "7"]


async def test_a_dead_shard_degrades_to_popular_for_a_user_without_a_precomputed_list() -> None:
    recommender = await make(FakeRanker(), embeddings=FakeEmbeddings(down=True))
    answer = await recommender.recommend("2", 3, RequestContext())
    assert answer.source == "popular" and answer.fallback_reason == "store_unavailable"
    assert [i for i, _ in answer.items] == ["9", "8", "7"]


async def test_unknown_user_gets_popular() -> None:
    answer = await (await make(FakeRanker())).recommend("stranger", 2, RequestContext())
    assert answer.source == "popular" and answer.fallback_reason == "unknown_user"


async def test_a_bug_is_not_swallowed_by_the_fallback() -> None:
    recommender = await make(FakeRanker(error=ValueError("shape bug")))
    with pytest.raises(ValueError, match="shape bug"):
        await recommender.recommend("1", 3, RequestContext())


async def test_concurrent_misses_for_one_user_rank_once() -> None:
    gate = asyncio.Event()
    ranker = FakeRanker(gate=gate)
    recommender = await make(ranker)
    recommender.settings = small_settings(request_ms=5000)
    requests = [asyncio.ensure_future(recommender.recommend("1", 3, RequestContext())) for _ in range(10)]
    await ranker.entered.wait()  # the leader is inside the ranker; the others must be waiting on it
    gate.set()
    answers = await asyncio.gather(*requests)
    assert ranker.calls == 1
    assert {a.source for a in answers} == {"realtime"}


async def test_store_errors_are_declared_dependency_errors() -> None:
    assert issubclass(StoreUnavailable, Exception)
    recommender = await make(FakeRanker(error=StoreUnavailable("x", ["s0"])))
    assert (await recommender.recommend("1", 1, RequestContext())).source == "precomputed"


async def test_a_saturated_process_answers_from_the_fallback_without_computing() -> None:
    ranker = FakeRanker()
    recommender = await make(ranker)
    # All of the 30 ms real-time budget is required: whatever the lookup took leaves too little.
    recommender.settings = small_settings(request_ms=50, min_compute_ms=30)
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "precomputed" and answer.fallback_reason == "overload"
    assert ranker.calls == 0


async def test_while_the_event_loop_runs_late_a_miss_answers_from_the_fallback_and_computes_again_after() -> None:
    ranker = FakeRanker()
    recommender = await make(ranker)
    recommender.hold.hold_s = 0.0  # not held: the next request computes again
    loop_late = True
    recommender.overloaded = lambda: loop_late
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "precomputed" and answer.fallback_reason == "overload"
    assert ranker.calls == 0
    loop_late = False
    assert (await recommender.recommend("1", 3, RequestContext())).source == "realtime"
    assert ranker.calls == 1


async def test_an_overload_fallback_is_held_for_the_users_next_requests_until_an_event() -> None:
    ranker = FakeRanker()
    recommender = await make(ranker, seen={"6"})
    loop_late = True
    recommender.overloaded = lambda: loop_late
    first = await recommender.recommend("1", 3, RequestContext())
    loop_late = False
    again = await recommender.recommend("1", 2, RequestContext())
    # Held: the same fallback (it still says so), without computing, although the loop has caught up.
    assert (first.source, first.fallback_reason) == (again.source, again.fallback_reason) == ("precomputed", "overload")
    assert [i for i, _ in first.items] == ["5", "7"] and again.items == first.items[:2]
    assert ranker.calls == 0
    await recommender.cache.invalidate("1")  # what a purchase does
    assert (await recommender.recommend("1", 3, RequestContext())).source == "realtime"
    assert ranker.calls == 1


async def test_a_fallback_because_a_dependency_is_down_is_not_held() -> None:
    recommender = await make(FakeRanker(error=RankerUnavailable("triton down")))
    first = await recommender.recommend("1", 3, RequestContext())
    assert first.fallback_reason == "ranker_unavailable"
    assert recommender.cache.stored == {}  # type: ignore[attr-defined]


def test_one_late_timer_is_not_overload_a_loop_late_sample_after_sample_is() -> None:
    monitor = LoopLagMonitor(threshold_s=0.005)
    for _ in range(20):
        monitor.record(0.0005)
    monitor.record(0.012)  # one collection, say
    assert not monitor.overloaded()
    for _ in range(5):
        monitor.record(0.008)
    assert monitor.overloaded()
    for _ in range(15):
        monitor.record(0.001)
    assert not monitor.overloaded()


class SignallingMonitor(LoopLagMonitor):
    """Signals every sample it records: the test waits for samples, not for time."""

    def __init__(self, threshold_s: float, interval_s: float) -> None:
        super().__init__(threshold_s, interval_s)
        self.sampled = asyncio.Event()

    def record(self, lag_s: float) -> None:
        super().record(lag_s)
        self.sampled.set()

    async def next_samples(self, count: int) -> None:
        for _ in range(count):
            self.sampled.clear()
            await asyncio.wait_for(self.sampled.wait(), 5)


async def test_the_loop_lag_monitor_sees_a_blocked_loop_and_then_its_recovery() -> None:
    monitor = SignallingMonitor(threshold_s=0.005, interval_s=0.002)
    task = asyncio.create_task(monitor.run())
    await monitor.next_samples(5)
    assert not monitor.overloaded()
    # The blocked loop is the point here: a callback that holds it for 50 ms.
    asyncio.get_running_loop().call_soon(time.sleep, 0.05)
    seen = []
    for _ in range(3):  # the sample that spans the hold is the first or second one after it
        await monitor.next_samples(1)
        seen.append(monitor.overloaded())
    assert any(seen)
    for _ in range(500):  # and on time again once it is over (a busy test machine adds its own lag)
        await monitor.next_samples(1)
        if not monitor.overloaded():
            break
    assert not monitor.overloaded()
    task.cancel()


def test_min_compute_must_fit_the_real_time_budget() -> None:
    with pytest.raises(ValueError, match=r"min_compute_ms must be in 0..request_ms - fallback_reserve_ms \(30.0\)"):
        DeadlineSettings(request_ms=50, fallback_reserve_ms=20, min_compute_ms=31)


async def test_warm_up_runs_the_compute_path_once_before_serving() -> None:
    ranker = FakeRanker()
    timings = await (await make(ranker)).warm_up(DIM, timeout_s=1.0)
    assert set(timings) == {"retrieval", "item_features", "ranking"}
    assert ranker.sizes == [8]  # as many rows as a request ranks (n_candidates)


async def test_a_failing_or_stuck_part_leaves_the_warm_up_bounded_and_does_not_stop_start_up() -> None:
    failing = FakeRanker(error=RankerUnavailable("Triton down"))
    assert set(await (await make(failing)).warm_up(DIM, timeout_s=1.0)) == {"retrieval", "item_features"}
    stuck = await make(FakeRanker(gate=asyncio.Event()))  # never answers
    started = time.perf_counter()
    assert "ranking" not in await stuck.warm_up(DIM, timeout_s=0.05)
    assert time.perf_counter() - started < 1.0


async def test_a_warm_up_whose_retrieval_fails_skips_the_item_reads_and_still_ranks() -> None:
    class TimingOutRetriever(FakeRetriever):
        async def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
            raise TimeoutError("index busy")

    ranker = FakeRanker()
    recommender = await make(ranker)
    recommender.retriever = TimingOutRetriever()
    assert set(await recommender.warm_up(DIM, timeout_s=1.0)) == {"ranking"}
    assert ranker.sizes == [8]


# -- admission by capacity (orchestrator/admission.py) and the budget that travels with the work ---------


class DictBackend:
    """A Redis of fixed values that counts the batches (round trips) it is sent."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.batches: list[list[Command]] = []

    async def execute(self, commands: Sequence[Command]) -> Replies:
        self.batches.append(list(commands))
        return Replies([self.values.get(c.key) for c in commands], np.zeros(len(commands), bool), ())

    async def control(self, command: Command) -> Any:
        raise NotImplementedError

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        raise NotImplementedError

    async def ready(self) -> Readiness:
        return Readiness(True, "ok")

    async def aclose(self) -> None: ...


def one_slot() -> AimdLimiter:
    return AimdLimiter(1, 1, 1, slow_s=10.0)


async def test_past_the_limit_a_miss_answers_at_once_from_the_precomputed_list_in_one_round_trip_then_held() -> None:
    redis = DictBackend({keys.recs("1"): encode_recs(PRECOMPUTED["1"]), keys.seen("1"): {b"6"}})
    store = CoalescingBackend(redis)  # as the composition root builds it: calls of one iteration, one batch
    precomputed, features = RedisPrecomputedStore(store), RedisFeatureStore(store, "v1")
    popular = PopularLists(FakePrecomputed(PRECOMPUTED))
    await popular.refresh()
    settings = small_settings(request_ms=5000)
    cache, gate = FakeCache(), asyncio.Event()
    ranker = FakeRanker(gate=gate)
    recommender = Recommender(
        settings,
        cache,
        FakeEmbeddings(),
        FakeFeatures(),
        FakeRetriever(),
        ranker,
        fallback_chain(precomputed, features, popular),
        OverloadHold(HeldInFakeCache(cache), settings.overload.hold_s, settings.ranking.list_length),
        n_items=len(ITEMS),
        admission=one_slot(),
    )
    computing = asyncio.ensure_future(recommender.recommend("2", 3, RequestContext()))
    await ranker.entered.wait()  # user 2's computation holds the only slot

    shed = await recommender.recommend("1", 3, RequestContext())
    assert (shed.source, shed.fallback_reason) == ("precomputed", "shed")
    assert [i for i, _ in shed.items] == ["5", "7"]  # less what the user bought since ("6")
    assert not computing.done() and ranker.calls == 1  # answered while the slot was still taken
    (batch,) = redis.batches  # the list and what the user bought: one round trip
    assert sorted(c.name for c in batch) == ["GET", "SMEMBERS"]

    again = await recommender.recommend("1", 2, RequestContext())
    assert (again.source, again.fallback_reason, again.items) == ("precomputed", "shed", shed.items[:2])
    assert len(redis.batches) == 1  # held for the user's next requests: no round trip at all
    gate.set()
    assert (await computing).source == "realtime"


async def test_a_miss_joins_the_computation_under_way_for_its_key_without_a_slot_and_only_others_are_shed() -> None:
    gate = asyncio.Event()
    ranker = FakeRanker(gate=gate)
    recommender = await make(ranker)
    recommender.settings = small_settings(request_ms=5000)
    recommender.admission = one_slot()
    first = asyncio.ensure_future(recommender.recommend("1", 3, RequestContext()))
    await ranker.entered.wait()
    same = asyncio.ensure_future(recommender.recommend("1", 3, RequestContext()))
    other = await recommender.recommend("2", 3, RequestContext())
    # User 2 has no pre-computed list: the popular list answers, and says why.
    assert (other.source, other.fallback_reason) == ("popular", "shed")
    gate.set()
    assert [a.source for a in await asyncio.gather(first, same)] == ["realtime", "realtime"]
    assert ranker.calls == 1


async def test_the_ranker_is_given_what_is_left_of_the_real_time_budget() -> None:
    ranker = FakeRanker()
    recommender = await make(ranker)  # 50 ms, 20 of them kept for the fallback
    assert (await recommender.recommend("1", 3, RequestContext())).source == "realtime"
    (budget,) = ranker.budgets
    assert budget is not None and 0 < budget <= 0.030


async def test_a_computation_past_its_deadline_backs_the_limit_off_and_past_it_on_a_late_loop_says_so() -> None:
    recommender = await make(FakeRanker(gate=asyncio.Event()))  # never answers
    recommender.admission = limits = AimdLimiter(4, 1, 8, slow_s=10.0, backoff_ratio=0.5)
    answer = await recommender.recommend("1", 3, RequestContext())
    assert (answer.source, answer.fallback_reason) == ("precomputed", "deadline")
    await until(lambda: limits.in_flight == 0, 1, "the computation ended at its own deadline")
    assert limits.limit == 2
    recommender.loop_late = lambda: True
    late = await recommender.recommend("1", 3, RequestContext(page_type="product"))
    assert (late.source, late.fallback_reason) == ("precomputed", "loop_late")
    await until(lambda: limits.in_flight == 0, 1, "the computation ended at its own deadline")
    assert limits.limit == 1


@pytest.mark.parametrize(
    ("timed_out", "loop_late", "reason", "limit"),
    [
        (True, True, "loop_late", 2),  # the shard may be fine: the time went to this process's backlog
        (True, False, "store_unavailable", 4),  # a slow shard, on a loop on time
        (False, True, "store_unavailable", 4),  # refused: the shard did not answer, however late the loop
    ],
)
async def test_a_read_that_missed_its_deadline_on_a_late_loop_is_told_from_a_shard_that_did_not_answer(
    timed_out: bool, loop_late: bool, reason: str, limit: int
) -> None:
    recommender = await make(FakeRanker(), embeddings=FakeEmbeddings(down=True, timed_out=timed_out))
    recommender.admission = limits = AimdLimiter(4, 1, 8, slow_s=10.0, backoff_ratio=0.5)
    recommender.loop_late = lambda: loop_late
    answer = await recommender.recommend("1", 3, RequestContext())
    assert (answer.source, answer.fallback_reason) == ("precomputed", reason)
    assert (limits.limit, limits.in_flight) == (limit, 0)  # only this process's own lateness backs off


async def test_a_computation_no_request_waits_for_stops_at_its_next_stage_and_frees_its_slot() -> None:
    embeddings = CountingEmbeddings()
    recommender = await make(FakeRanker(), embeddings=embeddings)
    recommender.settings = small_settings(request_ms=5000)
    recommender.retriever = retriever = GatedRetriever()
    recommender.admission = limits = AimdLimiter(4, 1, 8, slow_s=10.0)
    request = asyncio.ensure_future(recommender.recommend("1", 3, RequestContext()))
    await retriever.entered.wait()
    request.cancel()  # the request went away (its client, or the edge's own time limit)
    with pytest.raises(asyncio.CancelledError):
        await request
    retriever.gate.set()
    flight = recommender.single_flight
    assert flight is not None
    await until(lambda: flight.in_flight == 0, 1, "the computation over")
    assert embeddings.item_reads == 0  # stopped before the candidates' reads
    assert (limits.limit, limits.in_flight) == (4, 0)  # its slot is free, and nothing was learnt from it


async def test_a_computation_a_follower_still_waits_for_goes_on_when_the_first_request_goes() -> None:
    recommender = await make(FakeRanker())
    recommender.settings = small_settings(request_ms=5000)
    recommender.retriever = retriever = GatedRetriever()
    flight = recommender.single_flight
    assert flight is not None
    first = asyncio.ensure_future(recommender.recommend("1", 3, RequestContext()))
    await retriever.entered.wait()
    follower = asyncio.ensure_future(recommender.recommend("1", 3, RequestContext()))
    await until(
        lambda: flight.waiting(f"1|{recommender.model_version}|{RequestContext().cache_key}") == 2,
        1,
        "the follower joined",
    )
    first.cancel()
    retriever.gate.set()
    assert (await follower).source == "realtime"


async def test_a_new_computation_without_a_slot_is_a_bug_not_a_fallback() -> None:
    recommender = await make(FakeRanker())
    with pytest.raises(RuntimeError, match="expected a computation slot for a new computation, but found none"):
        await recommender._compute(recommender.current, "1", RequestContext(), 0, time.perf_counter() + 1, None)
