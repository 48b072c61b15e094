"""Fixtures for the data-plane integration tests: real redis-server processes the tests start."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from orchestrator.store.backend import Backend
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.sharded import ShardedBackend
from tests.redis_harness import (
    LocalCluster,
    RedisServer,
    flush,
    require_redis,
    running_servers,
    start_cluster,
)

# Generous for a shared 2-core machine; the deadline test sets its own, tighter value.
TIMEOUT_MS = 1000.0


@pytest.fixture(scope="session")
def shard_servers() -> Iterator[list[RedisServer]]:
    with running_servers(3) as servers:
        yield servers


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    require_redis()
    cluster = start_cluster(3)
    yield cluster
    cluster.stop()


@pytest.fixture
async def sharded(shard_servers: list[RedisServer]) -> AsyncIterator[ShardedBackend]:
    flush(shard_servers)
    backend = ShardedBackend.from_urls([s.url for s in shard_servers], timeout_ms=TIMEOUT_MS)
    yield backend
    await backend.aclose()


@pytest.fixture
async def clustered(local_cluster: LocalCluster) -> AsyncIterator[ClusterBackend]:
    flush(local_cluster.nodes)
    backend = await ClusterBackend.connect(local_cluster.url, timeout_ms=TIMEOUT_MS)
    yield backend
    await backend.aclose()


@pytest.fixture(params=["sharded", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each store test runs on both topologies."""
    made: Backend
    if request.param == "sharded":
        servers = request.getfixturevalue("shard_servers")
        flush(servers)
        made = ShardedBackend.from_urls([s.url for s in servers], timeout_ms=TIMEOUT_MS)
    else:
        cluster = request.getfixturevalue("local_cluster")
        flush(cluster.nodes)
        made = await ClusterBackend.connect(cluster.url, timeout_ms=TIMEOUT_MS)
    yield made
    await made.aclose()
