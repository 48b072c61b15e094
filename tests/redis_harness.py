"""Redis servers owned by the tests: standalone shards and a 3-master cluster on free ports.

Thin layer over ``stack.redis_local`` (which the benchmarks and ``python -m stack plan`` use too), plus a
helper to empty servers between tests. Never uses a system Redis.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from stack.redis_local import LocalCluster, RedisServer, start_cluster, start_server

__all__ = [
    "LocalCluster",
    "RedisServer",
    "flush",
    "require_redis",
    "running_servers",
    "start_cluster",
    "start_servers",
]


def require_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli not installed (run `make system-deps`)")


def start_servers(count: int) -> list[RedisServer]:
    servers: list[RedisServer] = []
    try:
        for _ in range(count):
            servers.append(start_server())
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@contextmanager
def running_servers(count: int) -> Iterator[list[RedisServer]]:
    """``count`` private servers for the block (skips where redis-server is missing), stopped after it."""
    require_redis()
    servers = start_servers(count)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def flush(servers: list[RedisServer]) -> None:
    for server in servers:
        subprocess.run(["redis-cli", "-p", str(server.port), "FLUSHALL"], check=True, capture_output=True)
