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
        return self.best(segment)[1]

    def best(self, segment: str) -> tuple[str, Recommendations]:
        """The segment's list, or the global list for a segment that has none, with the segment it is of."""
        if segment in self._lists:
            return segment, self._lists[segment]
        found = self._lists.get(schema.GLOBAL_SEGMENT)
        if found is None:
            raise LookupError("no popular lists loaded yet: run `python -m export load` against this Redis")
        return schema.GLOBAL_SEGMENT, found

    async def refresh(self) -> int:
        """Re-read every segment's list; returns how many came back. A segment whose read failed or found
        nothing keeps its last good list: the last resort must never become worse than it was."""
        results = await asyncio.gather(*(self.store.get_popular(s) for s in schema.SEGMENTS), return_exceptions=True)
        fresh: dict[str, Recommendations] = {}
        failures: list[BaseException] = []
        for segment, result in zip(schema.SEGMENTS, results, strict=True):
            if isinstance(result, StoreUnavailable | OSError | TimeoutError):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result is not None:
                fresh[segment] = result
        self._lists = {**self._lists, **fresh}
        if failures:
            log.warning("%d popular list(s) not refreshed (%s); keeping the ones in memory", len(failures), failures[0])
        return len(fresh)

    async def refresh_forever(self, every_s: float) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(every_s if self.loaded else min(every_s, 1.0))
