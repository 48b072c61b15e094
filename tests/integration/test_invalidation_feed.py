"""The cross-replica freshness bound, on real Redis servers: invalidations reach other replicas' local
layers at once, a silent or lost subscription stops local answers within the bound, and an invalidation
that cannot be published fails instead of leaving other replicas stale."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import redis
from redis.asyncio import Redis

from orchestrator.cache import CachedList, InvalidationFeed, LayeredCache, LocalTTLCache
from orchestrator.store.backend import ConnectionOptions
from orchestrator.store.errors import StoreUnavailable
from orchestrator.store.sharded import ShardedBackend
from tests.redis_harness import RedisServer, running_servers
from tests.waiting import until

pytestmark = pytest.mark.integration
MAX_SILENCE_S = 0.4
CONTEXT = "home|web"


@dataclass
class Replica:
    cache: LayeredCache
    feed: InvalidationFeed


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    """[data, pub/sub]: two servers, so that the channel can fail while the data stays reachable."""
    with running_servers(2) as started:
        yield started


@pytest.fixture
async def backend(servers: list[RedisServer]) -> AsyncIterator[ShardedBackend]:
    store = ShardedBackend.from_urls([servers[0].url], timeout_ms=2000, options=ConnectionOptions())
    yield store
    await store.aclose()


@asynccontextmanager
async def replica(backend: ShardedBackend, pubsub_url: str) -> AsyncIterator[Replica]:
    """One orchestrator's cache: its own local layer and invalidation feed, on the shared data server."""
    pubsub = Redis.from_url(pubsub_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    local = LocalTTLCache(1000, ttl_s=60)
    feed = InvalidationFeed(pubsub, local, MAX_SILENCE_S)
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.subscribed.wait(), 5)
        await until(feed.alive, 5, "the new replica's feed proven alive")
        yield Replica(LayeredCache(local, backend, pubsub, 300, local_trusted=feed.alive), feed)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()


async def cached_everywhere(user: str, *replicas: Replica) -> CachedList:
    value = CachedList(("old",), (1.0,), "v1", 0)
    await replicas[0].cache.set(user, CONTEXT, value)
    for replica in replicas:
        replica.cache.local.set(user, CONTEXT, value)
        assert (await replica.cache.get(user, CONTEXT)).layer == "local"
    return value


async def test_an_invalidation_empties_the_other_replicas_local_layer_at_once(
    backend: ShardedBackend, servers: list[RedisServer]
) -> None:
    async with replica(backend, servers[1].url) as a, replica(backend, servers[1].url) as b:
        stale = await cached_everywhere("u1", a, b)
        await a.cache.invalidate("u1")
        waited = await until(lambda: b.cache.local.get("u1", CONTEXT) is None, 5, "u1 evicted from B's local layer")
        assert waited < MAX_SILENCE_S
        assert (await b.cache.get("u1", CONTEXT)).value is None  # and Redis says miss too
        # A computation that read generation 0 before the event must not refill B's local layer.
        assert not b.cache.local.set("u1", CONTEXT, stale)
        assert b.cache.local.set("u1", CONTEXT, CachedList(("new",), (1.0,), "v1", 1))


async def test_a_silent_channel_stops_local_answers_within_the_bound(
    backend: ShardedBackend, servers: list[RedisServer]
) -> None:
    async with replica(backend, servers[1].url) as b:
        await cached_everywhere("u2", b)
        servers[1].pause()  # the channel stays open but nothing comes through it: messages may be lost
        try:
            waited = await until(lambda: not b.feed.alive(), 5, "the paused channel's feed no longer alive")
            assert waited <= MAX_SILENCE_S + 0.1
            lookup = await b.cache.get("u2", CONTEXT)
            assert lookup.layer == "redis", "the local layer answered without proof of freshness"
        finally:
            servers[1].resume()
        await until(b.feed.alive, 5, "the feed alive again once the channel resumed")
        assert (await b.cache.get("u2", CONTEXT)).layer in {"local", "redis"}


async def test_a_lost_subscription_empties_the_local_layer(backend: ShardedBackend, servers: list[RedisServer]) -> None:
    async with replica(backend, servers[1].url) as b:
        await cached_everywhere("u3", b)
        b.feed.subscribed.clear()
        killed = redis.Redis(port=servers[1].port).client_kill_filter(_type="pubsub")
        assert killed >= 1
        await asyncio.wait_for(b.feed.subscribed.wait(), 5)  # resubscribed...
        assert len(b.cache.local) == 0  # ...having forgotten what it may have missed invalidations for
        await until(b.feed.alive, 5, "the resubscribed feed proven alive")


async def test_an_invalidation_that_cannot_be_published_fails(
    backend: ShardedBackend, servers: list[RedisServer]
) -> None:
    async with replica(backend, servers[1].url) as a:
        await cached_everywhere("u4", a)
        servers[1].stop()
        with pytest.raises(StoreUnavailable, match="publish"):
            await a.cache.invalidate("u4")
        # The Redis layer is already safe (generation bumped); the client's retry publishes again.
        assert (await a.cache.get("u4", CONTEXT)).value is None
