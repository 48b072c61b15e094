"""User events: durable first (a Redis Stream, the offline pipeline's input), then applied online
(session list, purchase exclusion, cache invalidation). An event is acknowledged only once all of that
succeeded; a retry after a failure may append it to the stream twice (at-least-once), never zero times,
unless the client sends an ``event_id``: then a retry is stored once (``record``). Every per-user key an
event writes has a TTL or a cap: the session list (capped, expires), the purchased set and the cache
generation (expire after ``events.user_state_ttl_s``, renewed by each event), the event id (expires)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Literal

from orchestrator import metrics, session
from orchestrator.cache import RecommendationCache
from orchestrator.errors import ClientError
from orchestrator.store import FeatureStore, SessionEvent, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

EventType = Literal["view", "click", "add_to_cart", "purchase"]
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
# Actions that change what we should recommend right away, whether or not the request path reads the session.
SIGNIFICANT: frozenset[str] = frozenset({"add_to_cart", "purchase"})


def invalidating(session_aware: bool) -> frozenset[str]:
    """The events after which a user's cached lists are stale: the significant ones, and, while the request
    path reads the session (``session.max_events`` > 0), every kind the session weighs, since each moves the
    user's query (orchestrator/session.py). Invalidating is O(1) (one generation bump, cache.py), and only
    the user who acted misses: everyone else keeps their hit rate."""
    return SIGNIFICANT | frozenset(session.EVENT_WEIGHTS) if session_aware else SIGNIFICANT


STREAM_MAX_LEN = 1_000_000  # approximate trim: the stream is a buffer for the offline pipeline


# A claimed event id whose event is being stored. Longer than storing one event can take (a few
# round trips, each under the store's deadline); a claim left by a crash frees itself after it.
PENDING = b"pending"
PENDING_TTL_S = 10


class EventRecorder:
    def __init__(
        self,
        backend: Backend,
        features: FeatureStore,
        cache: RecommendationCache,
        user_state_ttl_s: int = 30 * 86_400,
        event_id_ttl_s: int = 86_400,
        invalidate_on: frozenset[str] = SIGNIFICANT,
    ) -> None:
        self.backend = backend
        self.features = features
        self.cache = cache
        self.user_state_ttl_s = user_state_ttl_s
        self.event_id_ttl_s = event_id_ttl_s
        self.invalidate_on = invalidate_on  # see ``invalidating``

    async def record(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        event_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Returns the stream entry id. Raises StoreUnavailable if any step could not be stored.

        With ``event_id`` (the client's), the event is stored once however often it is sent within
        ``event_id_ttl_s``: a retry after a 503 gets the first one's entry id if that one was stored after
        all, and is stored now if it was not. The id is claimed with SET NX first, so two copies sent at
        once are not both stored (the second gets ``EventInProgress``)."""
        # The answer this event follows (its X-Request-Id), kept in the stream: offline, a click joins exactly to
        # the answer it followed (and so to the answer's model version), whatever switched since.
        quoted = ("request_id", request_id) if request_id is not None else ()
        if event_id is None:
            return await self._store(user_id, item_id, event_type, quoted)
        key = keys.event_id(user_id, event_id)
        # One round trip (both commands on the user's shard, in order): claim the id, then read what holds it.
        replies = await self.backend.execute(
            [Command("SET", key, (PENDING, "NX", "EX", PENDING_TTL_S)), Command("GET", key)]
        )
        replies.raise_if_down("claim the event id")
        claimed, previous = replies.values
        if not claimed:
            if previous is None or previous == PENDING:  # None: the claim expired between the two commands
                raise EventInProgress(event_id)
            metrics.DUPLICATE_EVENTS.inc()
            return _text(previous)
        try:
            entry = await self._store(user_id, item_id, event_type, ("event_id", event_id, *quoted))
        except BaseException:
            # Not stored: free the id for the retry at once (if Redis cannot, the claim expires by itself).
            with contextlib.suppress(StoreUnavailable):
                await self.backend.execute([Command("DEL", key)])
            raise
        done = await self.backend.execute([Command("SET", key, (entry, "EX", self.event_id_ttl_s))])
        if done.down:
            # Stored, so still 202; only a retry after the claim expires could store it a second time.
            log.warning("event %s stored as %s, but its id could not be kept: %s", event_id, entry, done.down)
        return entry

    async def _store(self, user_id: str, item_id: str, event_type: str, extra: tuple[str, ...]) -> str:
        ts_ms = int(time.time() * 1000)
        fields = ("user_id", user_id, "item_id", item_id, "type", event_type, "ts_ms", ts_ms, *extra)
        replies = await self.backend.execute(
            [Command("XADD", keys.EVENTS_STREAM, ("MAXLEN", "~", STREAM_MAX_LEN, "*", *fields))]
        )
        replies.raise_if_down("append to the events stream")
        entry = replies.values[0]
        # The session list is capped and expires (RedisFeatureStore.add_event).
        await self.features.add_event(user_id, SessionEvent(item_id, event_type, ts_ms))
        if event_type == "purchase":
            # What this event adds to the user's purchased set expires with the set, renewed by each purchase:
            # a user who never comes back leaves nothing behind (the Kubernetes Redis evicts only keys with a TTL).
            seen = keys.seen(user_id)
            stored = await self.backend.execute(
                [Command("SADD", seen, (item_id,)), Command("EXPIRE", seen, (self.user_state_ttl_s,))]
            )
            stored.raise_if_down("add_seen(1 user)")
        if event_type in self.invalidate_on:
            await self.cache.invalidate(user_id)  # the generation counter it bumps expires too (cache.py)
        metrics.EVENTS.labels(event_type).inc()
        return _text(entry)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EventInProgress(ClientError):
    """The same event id is being stored right now (a retry sent before the first attempt was answered)."""

    status = 409

    def __init__(self, event_id: str) -> None:
        super().__init__(
            f"expected event {event_id!r} to be new or stored, but found it being stored now; retry after 1 s",
            {"Retry-After": "1"},
        )
