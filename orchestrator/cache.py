"""The layered recommendation cache: an in-process TTL-LRU in front of a shared Redis layer.

Freshness after an event (the documented bound is ``local_cache_ttl_s``, 1 s by default):
- Redis layer: every user has a generation counter beside the cached lists (same hash tag, so one
  pipeline reads both). An invalidation bumps it (and drops the lists); a list stamped with an older
  generation is a miss. So a list computed while the event happened can never be served from Redis.
- Local layer: the replica that handles the event evicts at once, and publishes the user id on a
  pub/sub channel so that every other replica evicts within milliseconds. Pub/sub is fire-and-forget,
  so the hard bound comes from the local TTL: a lost message costs at most ``local_cache_ttl_s``.
No ``KEYS``/``SCAN`` anywhere: invalidating a user is one INCR + one DEL + one PUBLISH.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from orchestrator import metrics
from orchestrator.store import keys
from orchestrator.store.backend import Backend, Command

log = logging.getLogger(__name__)

UNKNOWN_GENERATION = -1


@dataclass(frozen=True)
class CachedList:
    items: tuple[str, ...]
    scores: tuple[float, ...]
    model_version: str
    generation: int

    def encode(self) -> bytes:
        return orjson.dumps([list(self.items), list(self.scores), self.model_version, self.generation])

    @classmethod
    def decode(cls, raw: bytes) -> CachedList:
        items, scores, version, generation = orjson.loads(raw)
        return cls(tuple(items), tuple(scores), str(version), int(generation))


@dataclass(frozen=True)
class CacheLookup:
    value: CachedList | None
    layer: str | None  # "local" or "redis" on a hit
    generation: int  # the user's current generation (UNKNOWN_GENERATION if Redis did not answer)


class RecommendationCache(Protocol):
    async def get(self, user_id: str, context_key: str) -> CacheLookup: ...

    async def set(self, user_id: str, context_key: str, value: CachedList) -> None: ...

    async def invalidate(self, user_id: str) -> None: ...


class LocalTTLCache:
    """Bounded LRU with a per-entry TTL; evicts all of a user's contexts in O(contexts)."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[tuple[str, str], tuple[float, CachedList]] = OrderedDict()
        self._by_user: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str, context_key: str) -> CachedList | None:
        key = (user_id, context_key)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if expires_at < time.monotonic():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def set(self, user_id: str, context_key: str, value: CachedList) -> None:
        key = (user_id, context_key)
        self._entries[key] = (time.monotonic() + self.ttl_s, value)
        self._entries.move_to_end(key)
        self._by_user.setdefault(user_id, set()).add(context_key)
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))

    def evict_user(self, user_id: str) -> int:
        contexts = self._by_user.pop(user_id, set())
        for context_key in contexts:
            self._entries.pop((user_id, context_key), None)
        return len(contexts)

    def _remove(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)
        contexts = self._by_user.get(key[0])
        if contexts is not None:
            contexts.discard(key[1])
            if not contexts:
                del self._by_user[key[0]]


class LayeredCache:
    def __init__(self, local: LocalTTLCache, backend: Backend, pubsub: Redis | None, redis_ttl_s: int) -> None:
        self.local = local
        self.backend = backend
        self.pubsub = pubsub
        self.redis_ttl_s = redis_ttl_s

    async def get(self, user_id: str, context_key: str) -> CacheLookup:
        value = self.local.get(user_id, context_key)
        if value is not None:
            metrics.CACHE_HITS.labels("local").inc()
            return CacheLookup(value, "local", value.generation)
        metrics.CACHE_MISSES.labels("local").inc()
        replies = await self.backend.execute(
            [Command("HGET", keys.rec_cache(user_id), (context_key,)), Command("GET", keys.generation(user_id))]
        )
        if replies.down:
            metrics.CACHE_MISSES.labels("redis").inc()
            return CacheLookup(None, None, UNKNOWN_GENERATION)
        raw, raw_generation = replies.values
        generation = int(raw_generation or 0)
        if raw is not None:
            cached = CachedList.decode(raw)
            if cached.generation == generation:
                metrics.CACHE_HITS.labels("redis").inc()
                self.local.set(user_id, context_key, cached)
                return CacheLookup(cached, "redis", generation)
        metrics.CACHE_MISSES.labels("redis").inc()
        return CacheLookup(None, None, generation)

    async def set(self, user_id: str, context_key: str, value: CachedList) -> None:
        if value.generation == UNKNOWN_GENERATION:
            return  # computed while Redis was unreachable: its freshness cannot be proven
        self.local.set(user_id, context_key, value)
        key = keys.rec_cache(user_id)
        await self.backend.execute(
            [Command("HSET", key, (context_key, value.encode())), Command("EXPIRE", key, (self.redis_ttl_s,))]
        )

    async def invalidate(self, user_id: str) -> None:
        self.local.evict_user(user_id)
        metrics.INVALIDATIONS.labels("event").inc()
        replies = await self.backend.execute(
            [Command("INCR", keys.generation(user_id)), Command("DEL", keys.rec_cache(user_id))]
        )
        replies.raise_if_down("invalidate")
        if self.pubsub is not None:
            with contextlib.suppress(redis_errors.RedisError, OSError):
                await self.pubsub.publish(keys.INVALIDATION_CHANNEL, user_id)


async def listen_for_invalidations(pubsub: Redis, local: LocalTTLCache, ready: asyncio.Event | None = None) -> None:
    """Evict users that other replicas invalidated. Reconnects forever; cancelled at shutdown."""
    backoff_s = 0.1
    while True:
        try:
            channel = pubsub.pubsub(ignore_subscribe_messages=True)
            await channel.subscribe(keys.INVALIDATION_CHANNEL)
            if ready is not None:
                ready.set()
            backoff_s = 0.1
            async for message in channel.listen():
                if message.get("type") == "message":
                    data = message["data"]
                    local.evict_user(data.decode() if isinstance(data, bytes) else str(data))
                    metrics.INVALIDATIONS.labels("pubsub").inc()
        except asyncio.CancelledError:
            raise
        except (redis_errors.RedisError, OSError) as exc:
            log.warning("invalidation channel lost (%s); retrying in %.1f s", exc, backoff_s)
            # Anything cached meanwhile expires within the local TTL: the bound holds while we retry.
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)


class NoCache:
    """The cache switched off (the naive design and the no-cache ablation): every request computes."""

    async def get(self, user_id: str, context_key: str) -> CacheLookup:
        metrics.CACHE_MISSES.labels("none").inc()
        return CacheLookup(None, None, UNKNOWN_GENERATION)

    async def set(self, user_id: str, context_key: str, value: CachedList) -> None:
        return None

    async def invalidate(self, user_id: str) -> None:
        return None
