"""Redis Cluster through redis-py's cluster client: hash slots instead of our ring.

A batch is split by the node that owns each key's slot (redis-py's slot map) and sent as one plain
pipeline per node, nodes concurrently, each under ``timeout_ms``. Plain per-node connections keep a dead
node's failure inside its own group: redis-py's cluster pipeline reacts to one node's connection error
by resetting the client, which stalls the healthy nodes' groups too (measured: a batch lost every key).
Commands answered MOVED/ASK (resharding) are retried once through the cluster pipeline, which follows
the redirect and refreshes the slot map. No multi-key command ever spans slots: every command names one
key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from orchestrator.readiness import Readiness
from orchestrator.store.backend import (
    UNAVAILABLE_ERRORS,
    Command,
    ConnectionOptions,
    Replies,
    answers_ping,
    gather_groups,
    is_tls,
)
from orchestrator.store.errors import StoreConfigError, StoreUnavailable

UNCOVERED = "slots-not-covered"


class ClusterBackend:
    def __init__(
        self,
        client: RedisCluster,
        timeout_ms: float = 50.0,
        control_timeout_s: float = 5.0,
        options: ConnectionOptions | None = None,
        node_url_template: str = "redis://{host}:{port}",
        refresh_interval_s: float = 0.5,
    ) -> None:
        if timeout_ms <= 0:
            raise StoreConfigError("timeout_ms", "must be > 0", timeout_ms)
        self.client = client
        self.timeout_s = timeout_ms / 1000.0
        self.control_timeout_s = control_timeout_s
        self.options = options or ConnectionOptions(connect_timeout_s=self.timeout_s)
        self.node_url_template = node_url_template
        self.refresh_interval_s = refresh_interval_s
        self._node_clients: dict[str, Redis] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self.refreshes = 0

    @classmethod
    async def connect(
        cls, url: str, timeout_ms: float = 50.0, options: ConnectionOptions | None = None
    ) -> ClusterBackend:
        """Discovers the topology (CLUSTER SLOTS) from any one node's URL."""
        options = options or ConnectionOptions(connect_timeout_s=max(timeout_ms / 1000, 0.5))
        client = RedisCluster.from_url(
            url, **(options.client_kwargs(is_tls(url)) | {"socket_connect_timeout": max(timeout_ms / 1000, 0.5)})
        )
        await client.initialize()
        parts = urlsplit(url)
        # Per-node clients reuse the seed URL's scheme (TLS) and credentials, with each node's address.
        userinfo = parts.netloc.rpartition("@")[0]
        template = f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{{host}}:{{port}}"
        return cls(client, timeout_ms, options=options, node_url_template=template)

    def _node_client(self, name: str) -> Redis:
        client = self._node_clients.get(name)
        if client is None:
            node = self.client.get_node(node_name=name)
            if node is None:
                raise redis_errors.SlotNotCoveredError(f"node {name} left the cluster")
            client = self.options.client(self.node_url_template.format(host=node.host, port=int(node.port)))
            self._node_clients[name] = client
        return client

    def _topology_may_have_changed(self) -> None:
        """A node did not answer: re-read the slot map in the background (at most every
        ``refresh_interval_s``), so that once a replica is promoted its slots route to it. Our per-node
        pipelines bypass redis-py's own MOVED/reconnect handling, so nothing else would notice."""
        now = time.monotonic()
        if (
            self._refresh is not None and not self._refresh.done()
        ) or now - self._last_refresh < self.refresh_interval_s:
            return
        self._last_refresh = now

        async def refresh() -> None:
            with contextlib.suppress(*UNAVAILABLE_ERRORS, redis_errors.RedisClusterException):
                await self.client.nodes_manager.initialize()
                self.refreshes += 1

        self._refresh = asyncio.ensure_future(refresh())

    def node_name(self, key: str) -> str:
        try:
            node = self.client.get_node_from_key(key)
        except redis_errors.SlotNotCoveredError:
            return UNCOVERED
        return node.name if node is not None else UNCOVERED

    async def execute(self, commands: Sequence[Command]) -> Replies:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, command in enumerate(commands):
            groups[self.node_name(command.key)].append(i)

        async def run_group(name: str, indices: list[int]) -> list[Any]:
            if name == UNCOVERED:
                raise redis_errors.SlotNotCoveredError("no node serves these slots")
            pipe = self._node_client(name).pipeline(transaction=False)
            for i in indices:
                pipe.execute_command(*commands[i].argv())
            replies = list(await pipe.execute(raise_on_error=False))
            redirected = [
                k for k, r in enumerate(replies) if isinstance(r, (redis_errors.MovedError, redis_errors.AskError))
            ]
            if redirected:
                retry = self.client.pipeline()
                for k in redirected:
                    command = commands[indices[k]]
                    retry.execute_command(*command.argv())
                for k, reply in zip(redirected, await retry.execute(), strict=True):
                    replies[k] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply  # CLUSTERDOWN/TRYAGAIN count as unavailable; anything else is a bug
            return replies

        replies = await gather_groups(groups, len(commands), run_group, self.timeout_s)
        if replies.down:
            self._topology_may_have_changed()
        return replies

    async def control(self, command: Command) -> Any:
        try:
            async with asyncio.timeout(self.control_timeout_s):
                return await self.client.execute_command(*command.argv())
        except UNAVAILABLE_ERRORS:
            raise StoreUnavailable(f"{command.name} {command.key}", [self.node_name(command.key)]) from None

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        async def one(node: ClusterNode) -> int:
            deleted, chunk = 0, []
            async for key in self.client.scan_iter(match=pattern, count=batch, target_nodes=node):
                chunk.append(key)
                if len(chunk) >= batch:
                    deleted += await self._unlink(chunk)
                    chunk = []
            if chunk:
                deleted += await self._unlink(chunk)
            return deleted

        return sum(await asyncio.gather(*(one(n) for n in self.client.get_primaries())))

    async def _unlink(self, keys: list[bytes]) -> int:
        # One UNLINK per key: a multi-key UNLINK would span slots.
        pipe = self.client.pipeline()
        for key in keys:
            pipe.execute_command("UNLINK", key)
        return sum(await pipe.execute())

    async def ready(self) -> Readiness:
        return await answers_ping(self)

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in self._node_clients.values()))
        await self.client.aclose()
