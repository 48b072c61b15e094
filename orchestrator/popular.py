"""Popular lists per segment, held in memory: the last-resort answer must not depend on Redis answering.
Loaded at start-up and refreshed in the background."""

from __future__ import annotations

import asyncio
import logging

from orchestrator import schema
from orchestrator.store import PrecomputedStore, Recommendations
from orchestrator.store.errors import StoreUnavailable

log = logging.getLogger(__name__)


class PopularLists:
    def __init__(self, store: PrecomputedStore) -> None:
        self.store = store
        self._lists: dict[str, Recommendations] = {}

    @property
    def loaded(self) -> bool:
        return schema.GLOBAL_SEGMENT in self._lists

    def get(self, segment: str) -> Recommendations:
        """The segment's list; the global list for a segment that has none."""
        found = self._lists.get(segment) or self._lists.get(schema.GLOBAL_SEGMENT)
        if found is None:
            raise LookupError("no popular lists loaded yet: run `python -m export load` against this Redis")
        return found

    async def refresh(self) -> int:
        lists = await asyncio.gather(*(self.store.get_popular(s) for s in schema.SEGMENTS))
        fresh = {segment: recs for segment, recs in zip(schema.SEGMENTS, lists, strict=True) if recs is not None}
        if fresh:
            self._lists = fresh
        return len(fresh)

    async def refresh_forever(self, every_s: float) -> None:
        while True:
            try:
                await self.refresh()
            except (StoreUnavailable, OSError, TimeoutError) as exc:
                log.warning("popular lists not refreshed (%s); keeping the ones in memory", exc)
            await asyncio.sleep(every_s if self.loaded else min(every_s, 1.0))
