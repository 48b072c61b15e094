"""Against a real redis-server: the rate limit is one bucket per caller for every replica (N replicas do
not multiply it) and falls back to a local bucket when Redis is down; every key an event creates has a
TTL; an event retried with its event_id is stored once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from orchestrator.cache import LayeredCache, LocalTTLCache
from orchestrator.events import EventInProgress, EventRecorder
from orchestrator.ratelimit import Limit, SharedLimiter
from orchestrator.store import keys
from orchestrator.store.backend import Command
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.sharded import ShardedBackend
from tests.redis_harness import RedisServer, flush, running_servers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running_servers(1) as servers:
        yield servers[0]


@pytest.fixture
async def backends(redis_server: RedisServer) -> AsyncIterator[list[ShardedBackend]]:
    """Two replicas' backends on one Redis."""
    flush([redis_server])
    made = [ShardedBackend.from_urls([redis_server.url], timeout_ms=1000) for _ in range(2)]
    yield made
    for backend in made:
        await backend.aclose()


async def test_replicas_share_one_bucket_per_caller(backends: list[ShardedBackend]) -> None:
    limit = Limit(rate_per_s=0.01, burst=5)
    replicas = [SharedLimiter(backend, "w", limit) for backend in backends]
    waits = [await replicas[i % 2].wait_s("search") for i in range(10)]
    assert [w == 0 for w in waits] == [True] * 5 + [False] * 5  # 5 in all, not 5 per replica
    assert all(w > 1 for w in waits[5:])
    assert await replicas[1].wait_s("cart") == 0  # another caller, its own bucket
    ttl = await backends[0].control(Command("TTL", keys.rate_bucket("w", "search")))
    assert 0 < ttl <= limit.ttl_s  # forgotten once the bucket would be full again


async def test_without_redis_the_limit_fails_open_to_a_local_bucket() -> None:
    down = ShardedBackend.from_urls(["redis://127.0.0.1:1/0"], timeout_ms=200)
    try:
        limiter = SharedLimiter(down, "w", Limit(rate_per_s=0.01, burst=2))
        assert [await limiter.wait_s("search") == 0 for _ in range(3)] == [True, True, False]
    finally:
        await down.aclose()


def recorder(backend: ShardedBackend) -> EventRecorder:
    cache = LayeredCache(LocalTTLCache(10, 30), backend, None, 300, generation_ttl_s=3600)
    return EventRecorder(backend, RedisFeatureStore(backend, "v1"), cache, user_state_ttl_s=3600, event_id_ttl_s=600)


async def test_every_key_an_event_creates_expires(backends: list[ShardedBackend]) -> None:
    backend = backends[0]
    await recorder(backend).record("new-user", "12", "purchase", event_id="e-1")
    created = [keys.seen("new-user"), keys.session("new-user"), keys.generation("new-user")]
    created.append(keys.event_id("new-user", "e-1"))
    for key in created:
        ttl = await backend.control(Command("TTL", key))
        assert ttl > 0, f"{key} has no TTL ({ttl})"


async def test_an_event_retried_with_its_id_is_stored_once(backends: list[ShardedBackend]) -> None:
    first, second = recorder(backends[0]), recorder(backends[1])
    entry = await first.record("7", "12", "click", event_id="retry-1")
    assert await second.record("7", "12", "click", event_id="retry-1") == entry  # another replica, same answer
    assert await backends[0].control(Command("XLEN", keys.EVENTS_STREAM)) == 1
    # A copy sent while the first is still being stored is told to retry, not stored twice.
    await backends[0].control(Command("SET", keys.event_id("7", "busy"), (b"pending",)))
    with pytest.raises(EventInProgress, match=r"expected event 'busy' to be new or stored, but found it being"):
        await first.record("7", "12", "click", event_id="busy")
    assert await backends[0].control(Command("XLEN", keys.EVENTS_STREAM)) == 1
