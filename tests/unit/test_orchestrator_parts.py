"""Unit tests of the orchestrator's parts: cache, single-flight, breaker. No services (settings:
test_settings.py)."""

import asyncio
import gc

import pytest
from prometheus_client import REGISTRY

from orchestrator import gc_pauses
from orchestrator.cache import CachedList, LocalTTLCache
from orchestrator.ranking.breaker import CircuitBreaker
from orchestrator.singleflight import SingleFlight


def _value(tag: str, generation: int = 0) -> CachedList:
    return CachedList((tag,), (1.0,), "v1", generation)


def test_cached_list_round_trips() -> None:
    value = CachedList(("1", "2"), (0.5, 0.25), "v7", 3)
    assert CachedList.decode(value.encode()) == value


def test_local_cache_is_a_bounded_lru() -> None:
    cache = LocalTTLCache(max_entries=2, ttl_s=60)
    cache.set("u1", "home|web", _value("a"))
    cache.set("u2", "home|web", _value("b"))
    assert cache.get("u1", "home|web") == _value("a")  # touch u1: u2 is now least recent
    cache.set("u3", "home|web", _value("c"))
    assert cache.get("u2", "home|web") is None
    assert cache.get("u1", "home|web") is not None and len(cache) == 2


def test_local_cache_entries_expire() -> None:
    now = [100.0]
    cache = LocalTTLCache(max_entries=10, ttl_s=1.0, clock=lambda: now[0])
    cache.set("u", "ctx", _value("a"))
    now[0] += 0.9
    assert cache.get("u", "ctx") is not None
    now[0] += 0.2
    assert cache.get("u", "ctx") is None and len(cache) == 0


def test_evicting_a_user_drops_every_context_and_nobody_else() -> None:
    cache = LocalTTLCache(max_entries=10, ttl_s=60)
    cache.set("u", "home|web", _value("a"))
    cache.set("u", "cart|ios", _value("b"))
    cache.set("v", "home|web", _value("c"))
    assert cache.evict_user("u") == 2
    assert cache.get("u", "home|web") is None and cache.get("u", "cart|ios") is None
    assert cache.get("v", "home|web") == _value("c")


async def test_single_flight_runs_the_work_once_for_concurrent_callers() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return 42

    waiters = [asyncio.ensure_future(flight.do("k", work)) for _ in range(5)]
    await started.wait()  # the work task starts after every waiter (scheduled before it) reached the flight
    assert flight.in_flight == 1
    release.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1
    assert [r for r, _ in results] == [42] * 5
    assert sorted(joined for _, joined in results) == [False, True, True, True, True]
    assert flight.in_flight == 0


async def test_single_flight_gives_every_waiter_the_error() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        await release.wait()
        raise ConnectionError("shard down")

    waiters = [asyncio.ensure_future(flight.do("k", work)) for _ in range(3)]
    await started.wait()
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_waiters_deadline_does_not_cancel_the_shared_work() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        await release.wait()
        return 7

    impatient = asyncio.ensure_future(flight.do("k", work))
    patient = asyncio.ensure_future(flight.do("k", work))
    await started.wait()  # both wait on the shared work
    impatient.cancel()
    release.set()
    assert (await patient)[0] == 7
    with pytest.raises(asyncio.CancelledError):
        await impatient


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, reset_s=2.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 2.5
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_failure()
    assert breaker.state == "open"
    now[0] = 5.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_rejects_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="failures must be an integer >= 1, got 0"):
        CircuitBreaker(failures=0, reset_s=1.0)


def test_api_vocabularies_match_the_schema() -> None:
    from typing import get_args

    from orchestrator import schema
    from orchestrator.api.recommendations import Device, PageType

    assert set(get_args(PageType)) == set(schema.PAGE_TYPES[1:])
    assert set(get_args(Device)) == set(schema.DEVICES[1:])


def test_an_entry_may_have_a_shorter_life_than_the_cache_default() -> None:
    now = [0.0]
    cache = LocalTTLCache(max_entries=10, ttl_s=60, clock=lambda: now[0])
    cache.set("u", "home|web", _value("held"), ttl_s=2)
    cache.set("v", "home|web", _value("computed"))
    now[0] = 2.5
    assert cache.get("u", "home|web") is None
    assert cache.get("v", "home|web") == _value("computed")


def test_an_invalidated_user_refuses_lists_older_than_the_new_generation() -> None:
    cache = LocalTTLCache(max_entries=10, ttl_s=60)
    cache.set("u", "home|web", _value("a", generation=3))
    assert cache.evict_user("u", generation=4) == 1
    assert not cache.set("u", "home|web", _value("computed before the event", generation=3))
    assert cache.get("u", "home|web") is None
    assert cache.set("u", "home|web", _value("after", generation=4))
    assert cache.set("v", "home|web", _value("someone else", generation=0))


def test_clearing_the_local_cache_keeps_the_floors() -> None:
    cache = LocalTTLCache(max_entries=10, ttl_s=60)
    cache.evict_user("u", generation=2)
    cache.set("v", "home|web", _value("b"))
    cache.clear()
    assert len(cache) == 0
    assert not cache.set("u", "home|web", _value("stale", generation=1))


def test_floors_are_forgotten_after_they_can_matter() -> None:
    now = [0.0]
    cache = LocalTTLCache(max_entries=10, ttl_s=60, clock=lambda: now[0])
    cache.evict_user("u", generation=2)
    now[0] = 1000.0
    cache.evict_user("v", generation=1)  # pruning happens as new floors arrive
    assert cache.set("u", "home|web", _value("old", generation=1))


def test_full_collections_are_timed_while_installed_and_only_then() -> None:
    def full_collections() -> float:
        return REGISTRY.get_sample_value("recserve_gc_pause_seconds_count", {"generation": "2"}) or 0.0

    before = full_collections()
    gc_pauses.install()
    gc_pauses.install()  # idempotent: one observation per collection
    try:
        gc.collect()
    finally:
        gc_pauses.uninstall()
    assert full_collections() == before + 1
    gc.collect()
    assert full_collections() == before + 1
