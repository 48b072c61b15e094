"""User events: durable first (a Redis Stream, the offline pipeline's input), then applied online
(session list, purchase exclusion, cache invalidation). An event is acknowledged only once all of that
succeeded; a retry after a failure may append it to the stream twice (at-least-once), never zero times."""

from __future__ import annotations

import time
from typing import Literal

from orchestrator import metrics
from orchestrator.cache import RecommendationCache
from orchestrator.store import FeatureStore, SessionEvent, keys
from orchestrator.store.backend import Backend, Command

EventType = Literal["view", "click", "add_to_cart", "purchase"]
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
# Actions that change what we should recommend right away.
SIGNIFICANT: frozenset[str] = frozenset({"add_to_cart", "purchase"})
STREAM_MAX_LEN = 1_000_000  # approximate trim: the stream is a buffer for the offline pipeline


class EventRecorder:
    def __init__(self, backend: Backend, features: FeatureStore, cache: RecommendationCache) -> None:
        self.backend = backend
        self.features = features
        self.cache = cache

    async def record(self, user_id: str, item_id: str, event_type: str) -> str:
        """Returns the stream entry id. Raises StoreUnavailable if any step could not be stored."""
        ts_ms = int(time.time() * 1000)
        fields = ("user_id", user_id, "item_id", item_id, "type", event_type, "ts_ms", ts_ms)
        replies = await self.backend.execute(
            [Command("XADD", keys.EVENTS_STREAM, ("MAXLEN", "~", STREAM_MAX_LEN, "*", *fields))]
        )
        replies.raise_if_down("append to the events stream")
        entry = replies.values[0]
        await self.features.add_event(user_id, SessionEvent(item_id, event_type, ts_ms))
        if event_type == "purchase":
            await self.features.add_seen({user_id: [item_id]})
        if event_type in SIGNIFICANT:
            await self.cache.invalidate(user_id)
        metrics.EVENTS.labels(event_type).inc()
        return entry.decode() if isinstance(entry, bytes) else str(entry)
