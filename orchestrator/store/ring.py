"""Consistent hashing with virtual nodes: adding one shard to N moves about 1/(N+1) of the keys.

Each shard owns ``vnodes`` points on a 64-bit ring; a key belongs to the first point at or after its
hash. Many points per shard even out the arcs (the spread of shard loads falls like 1/sqrt(vnodes)).
Routing hashes the key's hash tag (``keys.hash_tag``), so keys that share a tag share a shard, as in
Redis Cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from orchestrator.store.errors import StoreConfigError
from orchestrator.store.keys import hash_tag


def hash64(value: str) -> int:
    # blake2b rather than Python's hash(): stable across processes and machines (PYTHONHASHSEED).
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


class HashRing:
    def __init__(self, shards: Sequence[str], vnodes: int = 160) -> None:
        if not shards:
            raise StoreConfigError("shards", "must name at least one shard", list(shards))
        if len(set(shards)) != len(shards):
            raise StoreConfigError("shards", "must be unique", list(shards))
        if vnodes < 1:
            raise StoreConfigError("vnodes", "must be an integer >= 1", vnodes)
        self.shards = tuple(shards)
        points = [(hash64(f"{name}#{v}"), k) for k, name in enumerate(self.shards) for v in range(vnodes)]
        points.sort()
        self._points = np.fromiter((p for p, _ in points), dtype=np.uint64, count=len(points))
        self._owners = np.fromiter((k for _, k in points), dtype=np.int64, count=len(points))

    def shard_indices(self, keys: Iterable[str]) -> np.ndarray:
        """Index into ``shards`` of each key's owner."""
        hashes = np.fromiter((hash64(hash_tag(k)) for k in keys), dtype=np.uint64)
        slot = np.searchsorted(self._points, hashes, side="left")
        slot[slot == len(self._points)] = 0  # past the last point: wrap to the first
        return self._owners[slot]

    def shard_for(self, key: str) -> str:
        return self.shards[int(self.shard_indices([key])[0])]
