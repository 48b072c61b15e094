"""The layered recommendation cache: an in-process TTL-LRU in front of a shared Redis layer.

Freshness after an event (the documented bound is ``cache.invalidation_max_silence_s``, 1 s by default):
- Redis layer: every user has a generation counter beside the cached lists (same hash tag, so one
  pipeline reads both). An invalidation bumps it (and drops the lists); a list stamped with an older
  generation is a miss. So a list computed while the event happened can never be served from Redis.
- Local layer: the replica that handles the event evicts at once and publishes ``user generation`` on a
  pub/sub channel, so that every other replica evicts within milliseconds; a failed publish fails the
  event (the client retries). Pub/sub drops messages only with the connection, so each replica's
  ``InvalidationFeed`` proves its subscription alive: a PONG to a PING sent at time t, on the same
  ordered connection, means every message published before t has arrived. The local layer answers only
  while that proof is at most ``cache.invalidation_max_silence_s`` old (else lookups go to the generation-checked
  Redis layer), and is emptied on every (re)subscription. Hence a long local TTL (``cache.local_ttl_s``,
  which bounds only changes that are not events, such as a new model version) without a stale answer
  beyond the bound.
- A read or computation in flight across an invalidation must not refill the local layer with what it
  saw before: the local layer remembers invalidated users' new generations for a while (``floor``) and
  refuses entries stamped with an older one.
No ``KEYS``/``SCAN`` anywhere: invalidating a user is one INCR + one DEL + one PUBLISH.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from orchestrator import metrics
from orchestrator.store import keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

UNKNOWN_GENERATION = -1
# How long an invalidated user's new generation is remembered: far longer than any read or computation
# can be in flight (the request deadline), so none of them can refill the local layer with an older list.
FLOOR_KEEP_S = 60.0


@dataclass(frozen=True)
class CachedList:
    items: tuple[str, ...]
    scores: tuple[float, ...]
    model_version: str
    generation: int
    # Set on a fallback answer held for a moment under overload (orchestrator/overload.py): what it is and
    # why, so that a hit on it says so. Such lists live in the local layer only, never in Redis.
    source: str = "realtime"
    fallback_reason: str | None = None
    segment: str | None = None  # a held popular list's segment

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

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, CachedList]] = OrderedDict()
        self._by_user: dict[str, set[str]] = {}
        self._floors: OrderedDict[str, tuple[int, float]] = OrderedDict()  # user -> (generation, when)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str, context_key: str) -> CachedList | None:
        key = (user_id, context_key)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if expires_at < self.clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def set(self, user_id: str, context_key: str, value: CachedList, ttl_s: float | None = None) -> bool:
        """False (not stored) if the user was invalidated to a newer generation than ``value``'s."""
        floor = self._floors.get(user_id)
        if floor is not None and value.generation < floor[0]:
            return False
        key = (user_id, context_key)
        self._entries[key] = (self.clock() + (self.ttl_s if ttl_s is None else ttl_s), value)
        self._entries.move_to_end(key)
        self._by_user.setdefault(user_id, set()).add(context_key)
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))
        return True

    def evict_user(self, user_id: str, generation: int | None = None) -> int:
        """Drop the user's lists; with ``generation`` (the user's new one), refuse older lists from now on."""
        if generation is not None:
            now = self.clock()
            known = self._floors.pop(user_id, None)
            self._floors[user_id] = (max(generation, known[0] if known else generation), now)
            while self._floors and next(iter(self._floors.values()))[1] < now - FLOOR_KEEP_S:
                self._floors.popitem(last=False)
        contexts = self._by_user.pop(user_id, set())
        for context_key in contexts:
            self._entries.pop((user_id, context_key), None)
        return len(contexts)

    def clear(self) -> None:
        """Drop every list (the invalidations that reached this replica are kept as floors)."""
        self._entries.clear()
        self._by_user.clear()

    def _remove(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)
        contexts = self._by_user.get(key[0])
        if contexts is not None:
            contexts.discard(key[1])
            if not contexts:
                del self._by_user[key[0]]


class LayeredCache:
    def __init__(
        self,
        local: LocalTTLCache,
        backend: Backend,
        pubsub: Redis | None,
        redis_ttl_s: int,
        local_trusted: Callable[[], bool] = lambda: True,
        generation_ttl_s: int = 30 * 86_400,
    ) -> None:
        if generation_ttl_s <= redis_ttl_s:
            raise ValueError(f"generation_ttl_s ({generation_ttl_s}) must be > redis_ttl_s ({redis_ttl_s})")
        self.local = local
        self.backend = backend
        self.pubsub = pubsub
        self.redis_ttl_s = redis_ttl_s
        # The counter outlives every list stamped with it (those live redis_ttl_s, and the DEL below drops them
        # at each bump), so when it expires, no list of an older era is left to be mistaken for current.
        self.generation_ttl_s = generation_ttl_s
        # False while this replica cannot prove it has heard every invalidation (InvalidationFeed.alive).
        self.local_trusted = local_trusted

    async def get(self, user_id: str, context_key: str) -> CacheLookup:
        value = self.local.get(user_id, context_key) if self.local_trusted() else None
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
        metrics.INVALIDATIONS.labels("event").inc()
        self.local.evict_user(user_id)  # at once, even if Redis then fails (the event is retried)
        replies = await self.backend.execute(
            [
                Command("INCR", keys.generation(user_id)),
                Command("EXPIRE", keys.generation(user_id), (self.generation_ttl_s,)),
                Command("DEL", keys.rec_cache(user_id)),
            ]
        )
        replies.raise_if_down("invalidate")
        generation = int(replies.values[0])
        self.local.evict_user(user_id, generation)
        if self.pubsub is not None:
            try:
                await self.pubsub.publish(keys.INVALIDATION_CHANNEL, invalidation_message(user_id, generation))
            except (redis_errors.RedisError, OSError) as exc:
                # Other replicas would keep the old list in their local layer: the event must be retried.
                raise StoreUnavailable("publish the invalidation", ["pubsub"]) from exc


def invalidation_message(user_id: str, generation: int) -> str:
    return f"{user_id} {generation}"  # ids never hold a space (ID_PATTERN, orchestrator/ids.py)


def parse_invalidation(data: bytes | str) -> tuple[str, int | None]:
    text = data.decode() if isinstance(data, bytes) else str(data)
    user_id, _, generation = text.rpartition(" ")
    if not user_id or not generation.isdigit():
        return text, None
    return user_id, int(generation)


class InvalidationFeed:
    """Applies other replicas' invalidations to the local layer and says whether the local layer may
    answer (``alive``): only while a PONG proves every invalidation published up to at most
    ``max_silence_s`` ago has arrived. Reconnects forever; cancel the task to stop it."""

    def __init__(
        self, pubsub: Redis, local: LocalTTLCache, max_silence_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.pubsub = pubsub
        self.local = local
        self.max_silence_s = max_silence_s
        self.ping_every_s = max_silence_s / 4
        self.clock = clock
        self.proven_at = -math.inf  # send time of the latest PING answered
        self.subscribed = asyncio.Event()

    def alive(self) -> bool:
        return self.clock() - self.proven_at <= self.max_silence_s

    async def run(self) -> None:
        backoff_s = 0.1
        while True:
            channel = self.pubsub.pubsub(ignore_subscribe_messages=True)
            try:
                await channel.subscribe(keys.INVALIDATION_CHANNEL)
                # What was published while this replica was not subscribed is lost: forget every list, now
                # and whenever redis-py reconnects and resubscribes on its own (it does not tell us otherwise).
                self.local.clear()
                if channel.connection is not None:  # set by subscribe
                    channel.connection.register_connect_callback(self._resubscribed)
                self.subscribed.set()
                backoff_s = 0.1
                await self._listen(channel)
            except asyncio.CancelledError:
                raise
            except (redis_errors.RedisError, OSError) as exc:
                raise_if_cancelling()
                log.warning("invalidation channel lost (%s); retrying in %.1f s", exc, backoff_s)
                # Meanwhile alive() turns false within max_silence_s: lookups go to the Redis layer.
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            finally:
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await channel.aclose()

    def _resubscribed(self, connection: object) -> None:
        log.warning("invalidation channel reconnected: local cache emptied")
        self.local.clear()

    async def _listen(self, channel: PubSub) -> None:
        pinged_at = -math.inf
        while True:
            raise_if_cancelling()
            now = self.clock()
            if now - pinged_at >= self.ping_every_s:
                pinged_at = now
                await channel.ping(repr(now))
            message = await channel.get_message(timeout=self.ping_every_s)
            if message is None:
                continue
            if message["type"] == "pong":
                self.proven_at = max(self.proven_at, float(message["data"]))
            elif message["type"] == "message":
                user_id, generation = parse_invalidation(message["data"])
                self.local.evict_user(user_id, generation)
                metrics.INVALIDATIONS.labels("pubsub").inc()


def raise_if_cancelling() -> None:
    """A cancel that lands in redis-py's read timeout can come out as a timeout (an empty read): the
    listener would go on forever. The task still knows it is being cancelled."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError


class NoCache:
    """The cache switched off (the naive design and the no-cache ablation): every request computes."""

    async def get(self, user_id: str, context_key: str) -> CacheLookup:
        metrics.CACHE_MISSES.labels("none").inc()
        return CacheLookup(None, None, UNKNOWN_GENERATION)

    async def set(self, user_id: str, context_key: str, value: CachedList) -> None:
        return None

    async def invalidate(self, user_id: str) -> None:
        return None
