"""Session-aware serving and fallbacks that follow the user, in the request flow, with in-process fakes of our
own Protocols (tests/unit/test_recommender_flow.py's, plus a session and a retriever that scores by dot
product). The real stack runs the same in tests/integration/test_session_serving.py."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from orchestrator import schema
from orchestrator.composition import fallback_chain
from orchestrator.config import SessionSettings, Settings
from orchestrator.errors import UserRead
from orchestrator.events import SIGNIFICANT, EventRecorder, invalidating
from orchestrator.fallback import FallbackRequest, SessionFallback
from orchestrator.overload import OverloadHold
from orchestrator.popular import PopularLists
from orchestrator.ranking import RankerUnavailable, RankingRequest
from orchestrator.readiness import Readiness
from orchestrator.recommender import Recommender, RequestContext
from orchestrator.session import blend_query, event_weights, interleave, session_vector
from orchestrator.store import Lookup, Recommendations, SessionEvent, keys
from orchestrator.store.coalesce import CoalescingBackend
from orchestrator.store.features import RedisFeatureStore
from tests.unit.test_recommender_flow import (
    ITEMS,
    PRECOMPUTED,
    DictBackend,
    FakeCache,
    FakeEmbeddings,
    FakeFeatures,
    FakePrecomputed,
    FakeRanker,
    HeldInFakeCache,
    small_settings,
)

AGE18 = 2  # age_bucket index of the "age18" segment (schema.AGE_BUCKETS[1])


def now_ms() -> int:
    return int(time.time() * 1000)


class SessionFeatures(FakeFeatures):
    """Feature rows (age bucket ``age_bucket`` for everyone; 0: no row) and a session list per user."""

    def __init__(self, events: dict[str, list[SessionEvent]] | None = None, age_bucket: int = 0) -> None:
        super().__init__()
        self.events = events or {}
        self.age_bucket = age_bucket
        self.session_reads: list[tuple[str, int]] = []

    async def get_rows(self, kind: str, ids: Sequence[str]) -> Lookup:
        width, n = len(schema.USER_FEATURES if kind == "user" else schema.ITEM_FEATURES), len(ids)
        rows = np.zeros((n, width), np.int64)
        if kind == "user":
            rows[:, 0] = self.age_bucket
        found = np.full(n, kind == "item" or self.age_bucket > 0)
        return Lookup(rows, found, np.zeros(n, bool))

    async def recent_events(self, user_id: str, limit: int) -> list[SessionEvent]:
        self.session_reads.append((user_id, limit))
        return self.events.get(user_id, [])[:limit]


class DotRetriever:
    """Every item, best first by dot product with the query (as the FAISS index ranks), recording each query."""

    def __init__(self, embeddings: FakeEmbeddings) -> None:
        self.matrix = np.stack([embeddings.vectors[f"item:{i}"] for i in ITEMS])
        self.queries: list[np.ndarray] = []

    async def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        self.queries.append(np.array(user_vectors[0]))
        scores = self.matrix @ user_vectors[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [[ITEMS[r] for r in order]], scores[order][None, :]

    async def ready(self) -> Readiness:
        return Readiness(True, "ok")

    async def aclose(self) -> None: ...


class RecordingRanker(FakeRanker):
    def __init__(self, error: BaseException | None = None) -> None:
        super().__init__(error=error)
        self.requests: list[RankingRequest] = []

    async def score(self, request: RankingRequest, timeout_s: float | None = None) -> np.ndarray:
        self.requests.append(request)
        return await super().score(request, timeout_s)


class SegmentPrecomputed(FakePrecomputed):
    """Pre-computed lists for user "1" only; a popular list for the global and the age18 segments."""

    async def get_popular(self, segment: str) -> Recommendations | None:
        if segment == "age18":
            return Recommendations(("4", "3", "2"), (3.0, 2.0, 1.0), "v-pop", 0.0)
        return await super().get_popular(segment)


async def make(
    features: SessionFeatures,
    ranker: FakeRanker | None = None,
    settings: Settings | None = None,
    overloaded: bool = False,
) -> tuple[Recommender, DotRetriever, FakeEmbeddings]:
    embeddings = FakeEmbeddings()
    retriever = DotRetriever(embeddings)
    precomputed = SegmentPrecomputed(PRECOMPUTED)
    popular = PopularLists(precomputed)
    await popular.refresh()
    settings = settings or small_settings(request_ms=500)
    cache = FakeCache()
    recommender = Recommender(
        settings,
        cache,
        embeddings,
        features,
        retriever,
        ranker or RecordingRanker(),
        fallback_chain(precomputed, features, popular, settings.ranking.list_length),
        OverloadHold(HeldInFakeCache(cache), settings.overload.hold_s, settings.ranking.list_length),
        n_items=len(ITEMS),
        overloaded=lambda: overloaded,
    )
    return recommender, retriever, embeddings


def clicks(*items: str, ago_s: float = 0.0, kind: str = "click") -> list[SessionEvent]:
    return [SessionEvent(item, kind, now_ms() - int(ago_s * 1000)) for item in items]


# -- the session moves the query --------------------------------------------------------------------------


async def test_session_events_move_the_query_for_retrieval_and_ranking() -> None:
    features = SessionFeatures({"1": clicks("3", "3", "4")})
    ranker = RecordingRanker()
    recommender, retriever, embeddings = await make(features, ranker)
    answer = await recommender.recommend("1", 3, RequestContext())

    assert answer.source == "realtime" and "session" in answer.timings_ms
    settings = recommender.settings.session
    item_vectors = np.stack([embeddings.vectors["item:3"], embeddings.vectors["item:4"]])
    weights = event_weights([("click", now_ms())] * 2, now_ms(), settings.window_s, settings.half_life_s)
    weights[0] *= 2  # item 3 was clicked twice: its events' weights add up
    expected = blend_query(embeddings.vectors["user:1"], session_vector(item_vectors, weights), settings.alpha)
    assert expected is not None
    np.testing.assert_allclose(retriever.queries[0], expected, rtol=1e-4)
    np.testing.assert_allclose(ranker.requests[0].user_embedding, expected, rtol=1e-4)  # the ranker scores it too
    assert features.session_reads == [("1", settings.max_events)]


async def test_the_session_gets_its_share_of_places_with_the_candidates_nearest_it() -> None:
    touched = "3"
    recommender, retriever, embeddings = await make(SessionFeatures({"1": clicks(touched)}))
    answer = await recommender.recommend("1", 5, RequestContext())

    vectors = {i: embeddings.vectors[f"item:{i}"] for i in ITEMS}
    query, session = retriever.queries[0], vectors[touched]  # one touched item: the session is its vector
    candidates = sorted(ITEMS, key=lambda i: -float(vectors[i] @ query))[:8]  # n_candidates
    ranked = candidates[::-1]  # the fake ranker scores by reverse retrieval order
    nearest = [i for i in sorted(candidates, key=lambda i: -float(vectors[i] @ session)) if i != touched]
    # Every other place (share 50 %) to the candidate nearest the session that is not the touched item.
    assert [i for i, _ in answer.items] == interleave(ranked, nearest, 0.5, 5)
    scores = dict(answer.items)
    assert [scores[i] for i in ranked if i in scores] == sorted(scores.values(), reverse=True)  # the ranker's


async def test_without_session_events_the_query_is_the_users_embedding() -> None:
    features = SessionFeatures()
    recommender, retriever, embeddings = await make(features)
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "realtime" and "session" not in answer.timings_ms
    np.testing.assert_array_equal(retriever.queries[0], embeddings.vectors["user:1"])


@pytest.mark.parametrize(
    "events",
    [
        clicks("3", ago_s=3600),  # past the 30-minute window
        clicks("3", kind="purchase"),  # bought: excluded from answers, not "more of the same"
        clicks("unknown-item"),  # no embedding for it: left out, and the session with it
    ],
    ids=["old", "purchase", "missing-item"],
)
async def test_events_that_do_not_count_leave_the_query_alone(events: list[SessionEvent]) -> None:
    recommender, retriever, embeddings = await make(SessionFeatures({"1": events}))
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "realtime"
    np.testing.assert_array_equal(retriever.queries[0], embeddings.vectors["user:1"])


async def test_a_share_of_zero_ignores_the_session_and_no_events_read_turns_it_off() -> None:
    base = small_settings(request_ms=500)
    ignored = base.model_copy(update={"session": SessionSettings(share_percent=0)})
    recommender, retriever, embeddings = await make(SessionFeatures({"1": clicks("3")}), settings=ignored)
    await recommender.recommend("1", 3, RequestContext())
    np.testing.assert_allclose(retriever.queries[0], embeddings.vectors["user:1"])

    off = base.model_copy(update={"session": SessionSettings(max_events=0)})
    features = SessionFeatures({"1": clicks("3")})
    recommender, retriever, embeddings = await make(features, settings=off)
    answer = await recommender.recommend("1", 3, RequestContext())
    assert features.session_reads == [] and "session" not in answer.timings_ms


async def test_the_session_list_travels_in_the_users_round_trip() -> None:
    redis = DictBackend({})
    features = RedisFeatureStore(CoalescingBackend(redis), "v1")  # as the composition root builds the reads
    recommender, _, _ = await make(SessionFeatures())
    recommender.swap(replace(recommender.current, features=features))
    await recommender.recommend("1", 3, RequestContext())
    first = redis.batches[0]  # the user's row, bought items and session: one batch, one shard (one hash tag)
    assert sorted(c.name for c in first) == ["GET", "LRANGE", "SMEMBERS"]
    session = next(c for c in first if c.name == "LRANGE")
    assert session.key == keys.session("1") and session.args == (0, recommender.settings.session.max_events - 1)
    assert {keys.hash_tag(c.key) for c in first} == {"u:1"}


# -- fallbacks that follow the user -----------------------------------------------------------------------


async def test_an_unknown_user_with_a_session_gets_items_near_it_without_those_touched() -> None:
    features = SessionFeatures({"stranger": clicks("3", "4")})
    recommender, retriever, embeddings = await make(features)
    answer = await recommender.recommend("stranger", 5, RequestContext())

    assert (answer.source, answer.fallback_reason, answer.segment) == ("session", "unknown_user", None)
    shown = [i for i, _ in answer.items]
    assert "3" not in shown and "4" not in shown and len(shown) == 5
    query = retriever.queries[-1]  # the session vector alone
    matrix = np.stack([embeddings.vectors[f"item:{i}"] for i in ITEMS])
    nearest = [ITEMS[r] for r in np.argsort(-(matrix @ query), kind="stable") if ITEMS[r] not in {"3", "4"}]
    assert shown == nearest[:5]  # ordered by nearness to the session
    assert [s for _, s in answer.items] == sorted((s for _, s in answer.items), reverse=True)
    assert answer.model_version == recommender.model_version
    assert len(features.session_reads) == 1  # the fallback read nothing again
    assert "session_retrieval" in answer.timings_ms


async def test_an_unknown_user_without_a_session_gets_their_segments_popular_list() -> None:
    recommender, _, _ = await make(SessionFeatures(age_bucket=AGE18))  # a feature row, but no embedding
    answer = await recommender.recommend("stranger", 3, RequestContext())
    assert (answer.source, answer.fallback_reason, answer.segment) == ("popular", "unknown_user", "age18")
    assert [i for i, _ in answer.items] == ["4", "3", "2"]

    recommender, _, _ = await make(SessionFeatures())  # no row: the global list, and it says so
    answer = await recommender.recommend("stranger", 3, RequestContext())
    assert (answer.source, answer.segment) == ("popular", "global")
    assert [i for i, _ in answer.items] == ["9", "8", "7"]


async def test_a_known_users_fallback_without_a_precomputed_list_is_their_segments() -> None:
    down = RecordingRanker(error=RankerUnavailable("down"))
    recommender, _, _ = await make(SessionFeatures(age_bucket=AGE18), down)
    answer = await recommender.recommend("2", 3, RequestContext())  # user 2 has no pre-computed list
    assert (answer.source, answer.fallback_reason, answer.segment) == ("popular", "ranker_unavailable", "age18")
    assert [i for i, _ in answer.items] == ["4", "3", "2"]

    with_list = await recommender.recommend("1", 3, RequestContext())
    assert (with_list.source, with_list.segment) == ("precomputed", None)


async def test_a_segment_without_a_list_gets_the_global_one_named_global() -> None:
    recommender, _, _ = await make(SessionFeatures(age_bucket=5), RecordingRanker(error=RankerUnavailable("down")))
    answer = await recommender.recommend("2", 3, RequestContext())
    assert (answer.source, answer.segment) == ("popular", "global")


async def test_a_held_popular_answer_still_says_whose_segment_it_is() -> None:
    recommender, _, _ = await make(SessionFeatures(age_bucket=AGE18), overloaded=True)
    first = await recommender.recommend("2", 3, RequestContext())
    again = await recommender.recommend("2", 3, RequestContext())  # from the overload hold (the local layer)
    assert (first.source, first.fallback_reason, first.segment) == ("popular", "overload", "age18")
    assert (again.source, again.fallback_reason, again.segment) == ("popular", "overload", "age18")


async def test_the_session_fallback_has_no_list_without_a_session_an_index_or_items_left() -> None:
    fallback = SessionFallback(list_length=3)
    retriever = DotRetriever(FakeEmbeddings())
    session = np.ones(4)

    def request(read: UserRead | None, with_index: bool = True) -> FallbackRequest:
        return FallbackRequest(
            "u", time.perf_counter() + 1, _NoTimer(), read=read, retriever=retriever if with_index else None
        )

    assert await fallback.lookup(request(None)) is None
    assert await fallback.lookup(request(UserRead("global", frozenset(), None, frozenset({"3"})))) is None
    read = UserRead("global", frozenset(), session, frozenset({"3"}))
    assert await fallback.lookup(request(read, with_index=False)) is None
    everything = UserRead("global", frozenset(ITEMS[:5]), session, frozenset(ITEMS[5:]))  # all bought or touched
    assert await fallback.lookup(request(everything)) is None
    found = await fallback.lookup(request(UserRead("global", frozenset({"1"}), session, frozenset({"2"}))))
    assert found is not None and len(found.items) == 3 and not {"1", "2"} & {i for i, _ in found.items}


class _NoTimer:
    def stage(self, name: str) -> _NoStage:
        return _NoStage()


class _NoStage:
    def __enter__(self) -> None: ...

    def __exit__(self, *exc: object) -> None: ...


# -- cached lists do not hide a session change --------------------------------------------------------------


class CountingCache(FakeCache):
    def __init__(self) -> None:
        super().__init__()
        self.invalidated: list[str] = []

    async def invalidate(self, user_id: str) -> None:
        self.invalidated.append(user_id)
        await super().invalidate(user_id)


def test_while_the_session_is_read_every_event_it_weighs_invalidates() -> None:
    assert invalidating(True) == {"view", "click", "add_to_cart", "purchase"}
    assert invalidating(False) == SIGNIFICANT == {"add_to_cart", "purchase"}


@pytest.mark.parametrize(("session_aware", "invalidated"), [(True, ["u1"]), (False, [])])
async def test_a_view_drops_the_users_lists_only_while_the_session_is_read(
    session_aware: bool, invalidated: list[str]
) -> None:
    cache = CountingCache()
    recorder = EventRecorder(DictBackend({}), SessionFeatures(), cache, invalidate_on=invalidating(session_aware))
    await recorder.record("u1", "3", "view")
    assert cache.invalidated == invalidated


async def test_a_user_without_new_events_keeps_their_cached_list() -> None:
    recommender, _, _ = await make(SessionFeatures())
    cache = recommender.cache
    assert isinstance(cache, FakeCache)
    for user in ("1", "2"):
        await recommender.recommend(user, 3, RequestContext())
    await recommender.drain()
    recorder = EventRecorder(DictBackend({}), SessionFeatures(), cache, invalidate_on=invalidating(True))
    await recorder.record("1", "3", "click")
    assert (await recommender.recommend("2", 3, RequestContext())).source == "cache"
    assert (await recommender.recommend("1", 3, RequestContext())).source == "realtime"


# -- the settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_events": 51}, r"max_events\n  Value error, must be an integer in 0..50 \(the events a session list"),
        ({"share_percent": 101}, r"share_percent\n  Value error, must be an integer in 0..100, got 101"),
        ({"window_s": 0}, r"window_s\n  Value error, must be > 0, got 0"),
        ({"half_life_s": -1}, r"half_life_s\n  Value error, must be > 0, got -1"),
    ],
)
def test_session_settings_are_checked_with_the_rule(values: dict[str, float], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SessionSettings(**values)
