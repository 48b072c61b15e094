"""Standalone Redis servers behind a client-side consistent-hash ring.

A batch is split by owner shard; each shard gets one MGET (all reads) or one non-transactional
pipeline (anything else); shards run concurrently, each under ``timeout_ms``. A shard that is down or
hung marks only its own keys unavailable. Control keys (version pointer, checkpoints) live on the
first shard, which the ring never moves.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from orchestrator.readiness import Readiness
from orchestrator.store.backend import (
    UNAVAILABLE_ERRORS,
    Command,
    ConnectionOptions,
    Replies,
    answers_ping,
    gather_groups,
)
from orchestrator.store.errors import StoreConfigError, StoreUnavailable
from orchestrator.store.ring import HashRing


def shard_name(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path if parts.path not in ('', '/0') else ''}"


class ShardedBackend:
    def __init__(
        self,
        clients: Mapping[str, Redis],
        timeout_ms: float = 50.0,
        vnodes: int = 160,
        control_timeout_s: float = 5.0,
    ) -> None:
        if timeout_ms <= 0:
            raise StoreConfigError("timeout_ms", "must be > 0", timeout_ms)
        self._clients = dict(clients)
        self.ring = HashRing(list(self._clients), vnodes)
        self.timeout_s = timeout_ms / 1000.0
        self.control_timeout_s = control_timeout_s
        self.control_shard = self.ring.shards[0]

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str],
        timeout_ms: float = 50.0,
        vnodes: int = 160,
        options: ConnectionOptions | None = None,
    ) -> ShardedBackend:
        """Clients connect lazily, on first use; each shard's pool is bounded (``options``)."""
        if not urls:
            raise StoreConfigError("shard urls", "must list at least one redis:// URL", list(urls))
        options = options or ConnectionOptions(connect_timeout_s=timeout_ms / 1000)
        clients = {shard_name(url): options.client(url) for url in urls}
        return cls(clients, timeout_ms, vnodes)

    @property
    def shards(self) -> tuple[str, ...]:
        return self.ring.shards

    async def execute(self, commands: Sequence[Command]) -> Replies:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, owner in enumerate(self.ring.owners([c.key for c in commands])):
            groups[self.ring.shards[owner]].append(i)

        async def run_group(name: str, indices: list[int]) -> list[Any]:
            client = self._clients[name]
            # One MGET/MSET instead of a pipeline of GETs/SETs: one command to parse, not hundreds.
            if all(commands[i].name == "GET" for i in indices):
                return list(await client.mget([commands[i].key for i in indices]))
            if all(commands[i].name == "SET" and len(commands[i].args) == 1 for i in indices):
                await client.mset({commands[i].key: commands[i].args[0] for i in indices})
                return [True] * len(indices)
            if len(indices) == 1:  # a pipeline of one costs ~20% more client CPU than the command itself
                command = commands[indices[0]]
                return [await client.execute_command(*command.argv())]
            gets = [i for i in indices if commands[i].name == "GET"]
            others = [i for i in indices if commands[i].name != "GET"]
            pipe = client.pipeline(transaction=False)
            # Reads batched with other calls (orchestrator/store/coalesce.py) stay one MGET, unless a write in
            # the same group touches one of their keys: then every command keeps its place in the order.
            hoist = len(gets) > 1 and not {commands[i].key for i in gets} & {commands[i].key for i in others}
            if hoist:
                pipe.mget([commands[i].key for i in gets])
            for i in others if hoist else indices:
                pipe.execute_command(*commands[i].argv())
            results = list(await pipe.execute())
            if not hoist:
                return results
            by_index = dict(zip(gets, results[0], strict=True)) | dict(zip(others, results[1:], strict=True))
            return [by_index[i] for i in indices]

        return await gather_groups(groups, len(commands), run_group, self.timeout_s)

    async def control(self, command: Command) -> Any:
        try:
            async with asyncio.timeout(self.control_timeout_s):
                return await self._clients[self.control_shard].execute_command(*command.argv())
        except UNAVAILABLE_ERRORS:
            raise StoreUnavailable(f"{command.name} {command.key}", [self.control_shard]) from None

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        async def one(client: Redis) -> int:
            deleted, chunk = 0, []
            async for key in client.scan_iter(match=pattern, count=batch):
                chunk.append(key)
                if len(chunk) >= batch:
                    deleted += await client.unlink(*chunk)
                    chunk.clear()
            if chunk:
                deleted += await client.unlink(*chunk)
            return deleted

        return sum(await asyncio.gather(*(one(c) for c in self._clients.values())))

    async def ready(self) -> Readiness:
        return await answers_ping(self)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients.values()))
