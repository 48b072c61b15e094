"""The fallback chain: order, declared errors only, the reason each answer gives; and the chain the composition
root builds (pre-computed, then popular) over fakes of our own store protocols."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pytest

from orchestrator import schema
from orchestrator.composition import fallback_chain
from orchestrator.errors import LoopLate, NoFallbackAnswer, Overloaded, Shed, UnknownUser
from orchestrator.fallback import Fallback, FallbackChain, FallbackList, FallbackRequest, reason_for
from orchestrator.popular import PopularLists
from orchestrator.ranking import RankerUnavailable
from orchestrator.store import Lookup, Recommendations, SessionEvent
from orchestrator.store.errors import StoreUnavailable

STORE_DOWN = StoreUnavailable("read", ("shard-0",))


class Stages:
    """Records the stages a fallback timed."""

    def __init__(self) -> None:
        self.names: list[str] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.names.append(name)
        yield


def request(user_id: str = "u1", deadline_s: float = 1.0) -> FallbackRequest:
    """A request due ``deadline_s`` from now (the chain's deadlines are ``time.perf_counter()`` times)."""
    return FallbackRequest(user_id, time.perf_counter() + deadline_s, Stages())


class ListSource:
    """A fallback source that answers with ``items``, has nothing (None), or fails with ``error``."""

    def __init__(self, name: str, items: list[str] | None = None, error: Exception | None = None) -> None:
        self.name = name
        self.items = items
        self.error = error
        self.asked = 0

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        self.asked += 1
        if self.error is not None:
            raise self.error
        if self.items is None:
            return None
        return FallbackList([(item, 1.0) for item in self.items], f"v-{self.name}")


DEPENDENCY = (TimeoutError, StoreUnavailable, RankerUnavailable)


async def test_the_first_fallback_with_a_list_answers_and_the_rest_are_not_asked() -> None:
    first, second = ListSource("first", ["a"]), ListSource("second", ["b"])
    chain = FallbackChain([Fallback(first, DEPENDENCY), Fallback(second, DEPENDENCY)])
    answer = await chain.answer(TimeoutError(), request())
    assert (answer.source, answer.items, answer.model_version, answer.reason) == (
        "first",
        [("a", 1.0)],
        "v-first",
        "deadline",
    )
    assert (first.asked, second.asked) == (1, 0)


async def test_a_fallback_without_a_list_or_failing_with_an_error_it_declares_hands_on_to_the_next() -> None:
    empty, failing, last = ListSource("empty"), ListSource("failing", error=STORE_DOWN), ListSource("last", ["c"])
    chain = FallbackChain([Fallback(empty, DEPENDENCY), Fallback(failing, DEPENDENCY), Fallback(last, DEPENDENCY)])
    answer = await chain.answer(RankerUnavailable("down"), request())
    assert (answer.source, answer.reason) == ("last", "ranker_unavailable")
    assert (empty.asked, failing.asked, last.asked) == (1, 1, 1)


async def test_an_error_a_fallback_does_not_declare_propagates_and_no_later_fallback_papers_over_it() -> None:
    buggy, last = ListSource("buggy", error=KeyError("shape bug")), ListSource("last", ["c"])
    chain = FallbackChain([Fallback(buggy, DEPENDENCY), Fallback(last, DEPENDENCY)])
    with pytest.raises(KeyError, match="shape bug"):
        await chain.answer(TimeoutError(), request())
    assert last.asked == 0


async def test_a_fallback_answers_only_for_the_failures_it_declares() -> None:
    for_dependencies, for_everyone = ListSource("for-deps", ["a"]), ListSource("for-everyone", ["b"])
    chain = FallbackChain([Fallback(for_dependencies, DEPENDENCY), Fallback(for_everyone, (*DEPENDENCY, UnknownUser))])
    answer = await chain.answer(UnknownUser("u1"), request())
    assert (answer.source, answer.reason) == ("for-everyone", "unknown_user")
    assert for_dependencies.asked == 0
    assert chain.catches == (TimeoutError, StoreUnavailable, RankerUnavailable, UnknownUser)


async def test_a_failure_no_fallback_declares_is_raised_as_it_is() -> None:
    source = ListSource("any", ["a"])
    chain = FallbackChain([Fallback(source, DEPENDENCY)])
    with pytest.raises(ValueError, match="a bug"):
        await chain.answer(ValueError("a bug"), request())
    assert source.asked == 0


async def test_a_chain_where_no_fallback_has_a_list_says_so() -> None:
    chain = FallbackChain([Fallback(ListSource("empty"), DEPENDENCY)])
    with pytest.raises(NoFallbackAnswer, match=r"expected one of the fallbacks \['empty'\] to answer for 'deadline'"):
        await chain.answer(TimeoutError(), request())


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (Shed(), "shed"),
        (LoopLate("a store read past its deadline"), "loop_late"),
        (Overloaded("an event loop that runs late"), "overload"),
        (UnknownUser("u1"), "unknown_user"),
        (TimeoutError(), "deadline"),
        (RankerUnavailable("triton down"), "ranker_unavailable"),
        (STORE_DOWN, "store_unavailable"),
    ],
)
def test_every_answer_says_why_it_was_not_computed(cause: Exception, reason: str) -> None:
    assert reason_for(cause) == reason


def test_a_chain_is_checked_when_it_is_built() -> None:
    with pytest.raises(ValueError, match="at least one fallback, but found none"):
        FallbackChain([])
    with pytest.raises(ValueError, match="fallback 'x' must declare the errors it catches, but found none"):
        FallbackChain([Fallback(ListSource("x"), ())])
    with pytest.raises(ValueError, match="but found KeyError; add it to REASONS"):
        FallbackChain([Fallback(ListSource("x"), (TimeoutError, KeyError))])


# -- the chain the service runs: pre-computed, then popular ---------------------------------------------


class FakePrecomputed:
    def __init__(self, lists: dict[str, Recommendations], down: bool = False, gate: asyncio.Event | None = None):
        self.lists = lists
        self.down = down
        self.gate = gate
        self.reads = 0

    async def get_recs(self, user_ids: Sequence[str]) -> list[Recommendations | None]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise STORE_DOWN
        return [self.lists.get(u) for u in user_ids]

    async def set_recs(self, recs: Mapping[str, Recommendations], ttl_s: int) -> None:
        raise NotImplementedError

    async def get_popular(self, segment: str) -> Recommendations | None:
        if segment == schema.GLOBAL_SEGMENT:
            return Recommendations(("9", "8", "7"), (3.0, 2.0, 1.0), "v-pop", 0.0)
        return None

    async def set_popular(self, segment: str, recs: Recommendations) -> None:
        raise NotImplementedError


class FakeSeen:
    """A feature store that knows only what each user bought."""

    def __init__(self, seen: set[str]) -> None:
        self._seen = seen

    async def seen(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        return [set(self._seen) for _ in user_ids]

    async def get_rows(self, kind: str, ids: Sequence[str]) -> Lookup:
        n, width = len(ids), len(schema.USER_FEATURES if kind == "user" else schema.ITEM_FEATURES)
        return Lookup(np.zeros((n, width), np.int64), np.zeros(n, bool), np.zeros(n, bool))  # no feature row

    async def set_rows(self, kind: str, ids: Sequence[str], rows: np.ndarray) -> None:
        raise NotImplementedError

    async def recent_events(self, user_id: str, limit: int) -> list[SessionEvent]:
        raise NotImplementedError

    async def add_event(self, user_id: str, event: SessionEvent) -> None:
        raise NotImplementedError

    async def add_seen(self, seen: Mapping[str, Sequence[str]], ttl_s: int | None = None) -> None:
        raise NotImplementedError


PRECOMPUTED = {"u1": Recommendations(("5", "6", "7"), (0.9, 0.8, 0.7), "v-old", 0.0)}


async def service_chain(precomputed: FakePrecomputed, seen: set[str] | None = None) -> FallbackChain:
    popular = PopularLists(precomputed)
    await popular.refresh()
    return fallback_chain(precomputed, FakeSeen(seen or set()), popular)


async def test_the_users_precomputed_list_answers_first_without_what_they_bought_since() -> None:
    chain = await service_chain(FakePrecomputed(PRECOMPUTED), seen={"6"})
    timed = request()
    answer = await chain.answer(Overloaded("an event loop that runs late"), timed)
    assert (answer.source, answer.model_version, answer.reason) == ("precomputed", "v-old", "overload")
    assert [i for i, _ in answer.items] == ["5", "7"]
    assert timed.timer.names == ["precomputed"]  # type: ignore[attr-defined]


async def test_without_a_precomputed_list_the_popular_one_answers_without_what_the_user_bought() -> None:
    chain = await service_chain(FakePrecomputed({}), seen={"8"})
    answer = await chain.answer(STORE_DOWN, request("u2"))
    assert (answer.source, answer.model_version, answer.reason) == ("popular", "v-pop", "store_unavailable")
    assert [i for i, _ in answer.items] == ["9", "7"]


async def test_an_unknown_user_gets_the_popular_list_without_a_precomputed_read() -> None:
    precomputed = FakePrecomputed(PRECOMPUTED)
    chain = await service_chain(precomputed)
    answer = await chain.answer(UnknownUser("stranger"), request("stranger"))
    assert (answer.source, answer.reason) == ("popular", "unknown_user")
    assert precomputed.reads == 0


async def test_a_precomputed_read_that_fails_or_runs_past_the_deadline_leaves_the_answer_to_popular() -> None:
    down = await service_chain(FakePrecomputed(PRECOMPUTED, down=True))
    assert (await down.answer(RankerUnavailable("down"), request())).source == "popular"
    stuck = await service_chain(FakePrecomputed(PRECOMPUTED, gate=asyncio.Event()))  # never answers
    answer = await stuck.answer(TimeoutError(), request(deadline_s=0.0))
    assert (answer.source, answer.reason) == ("popular", "deadline")
