"""A shard or cluster node that dies or hangs mid-run costs only its own keys, within the deadline,
without raising."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

from orchestrator.store import keys
from orchestrator.store.backend import Command
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.coalesce import CoalescingBackend
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.errors import StoreUnavailable
from orchestrator.store.sharded import ShardedBackend, shard_name
from orchestrator.store.versions import VersionInfo
from tests.redis_harness import LocalCluster, RedisServer, require_redis, running_servers, start_cluster

pytestmark = pytest.mark.integration
DEADLINE_MS = 300.0
IDS = [str(i) for i in range(200)]


@pytest.fixture
def doomed_servers() -> Iterator[list[RedisServer]]:
    """Servers this test may kill: never shared with other tests."""
    with running_servers(3) as servers:
        yield servers


async def loaded_store(servers: list[RedisServer]) -> tuple[ShardedBackend, RedisEmbeddingStore, np.ndarray]:
    backend = ShardedBackend.from_urls([s.url for s in servers], timeout_ms=DEADLINE_MS)
    store = RedisEmbeddingStore(backend, VersionInfo("v1", 8))
    matrix = np.arange(200 * 8, dtype=np.float32).reshape(200, 8)
    await store.set_batch("item", IDS, matrix)
    return backend, store, matrix


@pytest.mark.parametrize("failure", ["killed", "hung"])
async def test_a_failed_shard_reports_its_keys_unavailable_and_the_rest_come_back(
    doomed_servers: list[RedisServer], failure: str
):
    backend, store, matrix = await loaded_store(doomed_servers)
    victim = doomed_servers[1]
    owners = np.asarray([backend.ring.shard_for(k) for k in store_keys(store)])
    on_victim = owners == shard_name(victim.url)
    assert 0 < on_victim.sum() < 200

    for batch in range(4):  # the shard fails between batch 1 and 2 of a running loop
        if batch == 2:
            victim.kill() if failure == "killed" else victim.pause()
        started = time.perf_counter()
        lookup = await store.get_batch("item", IDS)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if batch < 2:
            assert lookup.found.all()
            continue
        assert lookup.down == (shard_name(victim.url),)
        # A hung shard missed its deadline (the caller may have been the late one); a dead one refused.
        assert lookup.timed_out == (lookup.down if failure == "hung" else ())
        assert lookup.unavailable.tolist() == on_victim.tolist()
        assert not lookup.found[on_victim].any() and lookup.found[~on_victim].all()
        np.testing.assert_array_equal(lookup.matrix[~on_victim], matrix[~on_victim])
        assert elapsed_ms < DEADLINE_MS + 250, f"took {elapsed_ms:.0f} ms with a {DEADLINE_MS:.0f} ms deadline"

    with pytest.raises(StoreUnavailable, match=rf"expected every shard to answer, but {shard_name(victim.url)}"):
        await store.set_batch("item", IDS, matrix)
    if failure == "hung":
        victim.resume()
        assert (await store.get_batch("item", IDS)).found.all()
    await backend.aclose()


def store_keys(store: RedisEmbeddingStore) -> list[str]:
    return keys.embeddings(store.version.version, "item", IDS)


@pytest.fixture
def doomed_cluster() -> Iterator[LocalCluster]:
    require_redis()
    cluster = start_cluster(3)
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("failure", ["killed", "hung"])
async def test_a_failed_cluster_node_costs_only_its_own_slots(doomed_cluster: LocalCluster, failure: str):
    backend = await ClusterBackend.connect(doomed_cluster.url, timeout_ms=DEADLINE_MS)
    store = RedisEmbeddingStore(backend, VersionInfo("v1", 8))
    matrix = np.arange(200 * 8, dtype=np.float32).reshape(200, 8)
    await store.set_batch("item", IDS, matrix)
    victim = doomed_cluster.nodes[2]
    on_victim = np.asarray([backend.node_name(k) == victim.address for k in store_keys(store)])
    assert 0 < on_victim.sum() < 200

    victim.kill() if failure == "killed" else victim.pause()
    for _ in range(3):  # stays contained on every batch, not only the first
        started = time.perf_counter()
        lookup = await store.get_batch("item", IDS)
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert lookup.down == (victim.address,)
        assert lookup.unavailable.tolist() == on_victim.tolist()
        np.testing.assert_array_equal(lookup.matrix[~on_victim], matrix[~on_victim])
        assert elapsed_ms < DEADLINE_MS + 250, f"took {elapsed_ms:.0f} ms with a {DEADLINE_MS:.0f} ms deadline"
    if failure == "hung":
        victim.resume()
    await backend.aclose()


def connections_received(server: RedisServer) -> int:
    info = subprocess.run(
        ["redis-cli", "-p", str(server.port), "INFO", "stats"], check=True, capture_output=True, text=True
    ).stdout
    return int(next(line for line in info.splitlines() if line.startswith("total_connections_received:")).split(":")[1])


async def test_a_read_past_its_deadline_finishes_and_keeps_its_connection(doomed_servers: list[RedisServer]):
    """A missed deadline must not cost a reconnect: under a burst, reconnects would feed the burst."""
    server = doomed_servers[0]
    backend = ShardedBackend.from_urls([server.url], timeout_ms=50)
    store = RedisEmbeddingStore(backend, VersionInfo("v1", 8))
    matrix = np.arange(200 * 8, dtype=np.float32).reshape(200, 8)
    await store.set_batch("item", IDS, matrix)  # opens the pool's one connection
    before = connections_received(server)

    server.pause()
    started = time.perf_counter()
    running = asyncio.all_tasks()
    lookup = await store.get_batch("item", IDS)
    assert lookup.down == (shard_name(server.url),)  # the caller got its answer at the deadline...
    assert (time.perf_counter() - started) * 1000 < 50 + 250
    late = asyncio.all_tasks() - running
    assert late, "no read was left running past the deadline"
    server.resume()
    await asyncio.wait_for(asyncio.gather(*late), 5)  # ...while the read itself went on and got its reply

    for _ in range(5):
        lookup = await store.get_batch("item", IDS)
        np.testing.assert_array_equal(lookup.matrix, matrix)
    # One connection for the redis-cli calls themselves; none for the store.
    assert connections_received(server) - before == 1
    await backend.aclose()


async def test_a_mixed_group_keeps_each_reply_in_place_and_a_read_after_a_write_sees_it(
    doomed_servers: list[RedisServer],
):
    backend = CoalescingBackend(ShardedBackend.from_urls([doomed_servers[0].url], timeout_ms=DEADLINE_MS))
    await backend.execute([Command("SET", "a", ("1",)), Command("SET", "b", ("2",)), Command("SADD", "s", ("x",))])
    # Two callers in one iteration: their reads become one MGET beside the other commands, in place.
    first, second = await asyncio.gather(
        backend.execute([Command("GET", "a"), Command("SMEMBERS", "s"), Command("GET", "missing")]),
        backend.execute([Command("GET", "b"), Command("HGET", "h", ("f",))]),
    )
    assert first.values == [b"1", {b"x"}, None] and second.values == [b"2", None]
    # A write and a read of the same key in one batch keep their order.
    replies = await backend.execute([Command("SET", "a", ("3",)), Command("GET", "a"), Command("GET", "b")])
    assert replies.values[1:] == [b"3", b"2"]
    await backend.aclose()
