"""The last resort never fails: a refresh during a shard outage keeps the last good lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from orchestrator import schema
from orchestrator.popular import PopularLists
from orchestrator.store import Recommendations
from orchestrator.store.errors import StoreUnavailable

GOOD = Recommendations(("1", "2"), (2.0, 1.0), "v1", 0.0)
NEWER = Recommendations(("3", "4"), (2.0, 1.0), "v2", 0.0)


class OutageStore:
    """Each segment's list, or StoreUnavailable for the segments whose shard is down."""

    def __init__(self, lists: dict[str, Recommendations]) -> None:
        self.lists = lists
        self.down: set[str] = set()

    async def get_recs(self, user_ids: Sequence[str]) -> list[Recommendations | None]:
        return [None for _ in user_ids]

    async def set_recs(self, recs: Mapping[str, Recommendations], ttl_s: int) -> None: ...

    async def get_popular(self, segment: str) -> Recommendations | None:
        if segment in self.down:
            raise StoreUnavailable(f"get_popular({segment})", ("shard-0",))
        return self.lists.get(segment)

    async def set_popular(self, segment: str, recs: Recommendations) -> None: ...


async def test_a_refresh_during_an_outage_keeps_the_last_good_lists() -> None:
    store = OutageStore({segment: GOOD for segment in schema.SEGMENTS})
    popular = PopularLists(store)
    assert await popular.refresh() == len(schema.SEGMENTS)

    store.down = {schema.GLOBAL_SEGMENT}
    store.lists = {segment: NEWER for segment in schema.SEGMENTS}
    assert await popular.refresh() == len(schema.SEGMENTS) - 1
    assert popular.get(schema.GLOBAL_SEGMENT) == GOOD, "the unreachable segment keeps its last good list"
    other = next(s for s in schema.SEGMENTS if s != schema.GLOBAL_SEGMENT)
    assert popular.get(other) == NEWER, "segments that answered take the new list"


async def test_a_list_that_disappears_keeps_the_last_good_one() -> None:
    store = OutageStore({schema.GLOBAL_SEGMENT: GOOD})
    popular = PopularLists(store)
    await popular.refresh()
    store.lists = {}
    assert await popular.refresh() == 0
    assert popular.get(schema.GLOBAL_SEGMENT) == GOOD


async def test_nothing_loaded_says_what_to_run() -> None:
    store = OutageStore({})
    store.down = set(schema.SEGMENTS)
    popular = PopularLists(store)
    assert await popular.refresh() == 0
    assert not popular.loaded
    with pytest.raises(LookupError, match="python -m export load"):
        popular.get(schema.GLOBAL_SEGMENT)
