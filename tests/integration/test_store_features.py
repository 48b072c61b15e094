"""Feature rows, sessions, seen sets and the pre-computed/popular lists on both topologies."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator import schema
from orchestrator.store import Recommendations, SessionEvent, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.errors import StoreConfigError
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.precomputed import RedisPrecomputedStore

pytestmark = pytest.mark.integration


async def test_feature_rows_round_trip_with_misses(backend: Backend):
    store = RedisFeatureStore(backend, "v1")
    rows = np.array([[1, 2, 3], [7, 1, 21]], dtype=np.int64)
    await store.set_rows("user", ["u1", "u2"], rows)
    matrix, found = await store.get_rows("user", ["u2", "ghost", "u1"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(matrix, [[7, 1, 21], [0, 0, 0], [1, 2, 3]])
    assert not (await store.get_rows("item", ["u1"])).found.any()


async def test_session_is_a_capped_newest_first_list_with_a_ttl(backend: Backend):
    store = RedisFeatureStore(backend, "v1", session_cap=3, session_ttl_s=600)
    for t in range(5):
        await store.add_event("u1", SessionEvent(f"i{t}", "view", 1000 + t))
    events = await store.recent_events("u1", 10)
    assert [e.item_id for e in events] == ["i4", "i3", "i2"]
    assert events[0] == SessionEvent("i4", "view", 1004)
    ttl = (await backend.execute([Command("TTL", keys.session("u1"))])).values[0]
    assert 0 < ttl <= 600
    assert await store.recent_events("nobody", 10) == []


async def test_seen_sets_are_idempotent_unions(backend: Backend):
    store = RedisFeatureStore(backend, "v1")
    await store.add_seen({"u1": ["a", "b"], "u2": ["c"], "u3": []})
    await store.add_seen({"u1": ["b", "d"]})
    assert await store.seen(["u1", "u2", "u3"]) == [{"a", "b", "d"}, {"c"}, set()]
    assert (await backend.execute([Command("TTL", keys.seen("u1"))])).values[0] == -1
    # With a TTL (the loader's): every touched set expires, and a later union renews it.
    await store.add_seen({"u1": ["e"], "u2": ["f"]}, ttl_s=600)
    ttls = (await backend.execute([Command("TTL", keys.seen(u)) for u in ("u1", "u2")])).values
    assert all(0 < t <= 600 for t in ttls), ttls


async def test_precomputed_lists_carry_metadata_and_expire(backend: Backend):
    store = RedisPrecomputedStore(backend)
    recs = {
        "u1": Recommendations(("3", "1"), (0.9, 0.2), "v1", 1_700_000_000.0),
        "u2": Recommendations(("5",), (0.5,), "v1", 1_700_000_001.0),
    }
    await store.set_recs(recs, ttl_s=3600)
    assert await store.get_recs(["u2", "none", "u1"]) == [recs["u2"], None, recs["u1"]]
    ttl = (await backend.execute([Command("TTL", keys.recs("u1"))])).values[0]
    assert 3500 < ttl <= 3600


async def test_popular_lists_per_segment_never_expire(backend: Backend):
    store = RedisPrecomputedStore(backend)
    popular = Recommendations(("1", "2", "3"), (30.0, 20.0, 10.0), "v1", 1.0)
    for segment in schema.SEGMENTS:
        await store.set_popular(segment, popular)
    assert await store.get_popular(schema.GLOBAL_SEGMENT) == popular
    assert (await backend.execute([Command("TTL", keys.popular("age25"))])).values[0] == -1
    with pytest.raises(StoreConfigError, match=r"segment must be one of \['global', .*\], but found 'teens'"):
        await store.get_popular("teens")
