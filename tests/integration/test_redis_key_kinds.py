"""``export.plan.measure_key_kinds`` against a real redis-server: every key kind written in the project's own
layout, counted, and measured; ``isolate`` charges each kind for its own keys only."""

from __future__ import annotations

import asyncio

import pytest
from redis import Redis

from export import capacity
from export.plan import KEY_KINDS, FillSpec, measure_key_kinds
from tests.redis_harness import running_servers

pytestmark = pytest.mark.integration


def test_every_key_kind_is_written_counted_and_measured() -> None:
    spec = FillSpec(users=300, items=400, dim=16, cached_users=60, chunk=128, id_space=100_000)
    with running_servers(1) as (server,):
        result = asyncio.run(measure_key_kinds(server.url, spec, progress=False, probe=50))
        client = Redis.from_url(server.url)
        try:
            dbsize = client.dbsize()
            seen_key = client.keys("seen:*")[0]
            cache_key = client.keys("rc:*")[0]
            encoding, cache_ttl = client.object("encoding", seen_key), client.ttl(cache_key)
        finally:
            client.close()
    assert list(result.kinds) == list(KEY_KINDS)
    assert {k: m.keys for k, m in result.kinds.items()} == {
        "user_embedding": 300,
        "item_embedding": 400,
        "user_features": 300,
        "item_features": 400,
        "seen": 300,
        "precomputed": 300,
        "cache_entry": 60,
    }
    assert dbsize == 300 * 4 + 400 * 2 + 60
    assert encoding == b"intset", "numeric ids under 512 per set: an intset, as in production"
    assert 0 < cache_ttl <= 300
    assert all(m.used_memory_delta > 0 and m.memory_usage_mean > 0 for m in result.kinds.values())
    assert result.data_bytes == sum(m.used_memory_delta for m in result.kinds.values())
    assert 100 < result.mean_history < 140
    # A cached top-100 list holds twice the items of a top-50 pre-computed list, plus the scores: larger.
    assert result.kinds["cache_entry"].memory_usage_mean > result.kinds["precomputed"].memory_usage_mean


def test_isolate_measures_each_kind_alone_and_the_plan_counts_them() -> None:
    spec = FillSpec(users=200, items=200, dim=16, cached_users=40, id_space=100_000)
    with running_servers(1) as (server,):
        kinds = ("seen", "cache_entry")
        result = asyncio.run(measure_key_kinds(server.url, spec, progress=False, kinds=kinds, isolate=True))
        client = Redis.from_url(server.url)
        try:
            left = client.dbsize()
        finally:
            client.close()
    assert list(result.kinds) == list(kinds) and left == 40, "FLUSHALL before each kind: the last one stays"
    seen = result.kinds["seen"].bytes_per_key
    measurements = {
        key: capacity.Measurement(v, "bytes", "test", False)
        for key, v in {
            "redis_bytes_per_embedding_128_fp32": 700.0,
            "redis_bytes_per_feature_row": 100.0,
            "redis_bytes_per_seen_set": seen,
            "redis_bytes_per_precomputed_list": 1000.0,
            "redis_bytes_per_cache_entry": result.kinds["cache_entry"].bytes_per_key,
        }.items()
    }
    load = capacity.Load(users=1000, qps=1, p99_ms=100, cache_hit_rate=0.5, items=10)
    by_kind, _, _ = capacity.redis_data_bytes(load, measurements, capacity.Policy(cache_user_fraction=0.2))
    assert by_kind["seen_sets"] == 1000 * seen
    assert by_kind["cache_entries"] == 200 * result.kinds["cache_entry"].bytes_per_key
