"""Consistent hashing with virtual nodes: adding one shard to N moves about 1/(N+1) of the keys.

Each shard owns ``vnodes`` points on a 64-bit ring; a key belongs to the first point at or after its
hash. Many points per shard even out the arcs (the spread of shard loads falls like 1/sqrt(vnodes)).
Routing hashes the key's hash tag (``keys.hash_tag``), so keys that share a tag share a shard, as in
Redis Cluster.

Owners are memoised per key: the ring never changes after it is built, and a realtime request routes
hundreds of the same catalogue keys (candidate embeddings and features) that every other request routes
too; hashing them each time costs ~6% of a serving process's CPU under the reference mix.
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


# Bounded so that a stream of one-off keys (100M users) cannot grow it without limit; when full it starts
# over, and the hot catalogue keys are back in it within a request or two.
OWNER_MEMO_SIZE = 1 << 18


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
        self._owner_memo: dict[str, int] = {}

    def owners(self, keys: Iterable[str]) -> list[int]:
        """Index into ``shards`` of each key's owner."""
        keys = list(keys)
        if len(self.shards) == 1:
            return [0] * len(keys)
        memo = self._owner_memo
        owners = [memo.get(k, -1) for k in keys]
        unknown = [i for i, owner in enumerate(owners) if owner < 0]
        if unknown:
            hashes = np.fromiter((hash64(hash_tag(keys[i])) for i in unknown), dtype=np.uint64, count=len(unknown))
            slot = np.searchsorted(self._points, hashes, side="left")
            slot[slot == len(self._points)] = 0  # past the last point: wrap to the first
            if len(memo) + len(unknown) > OWNER_MEMO_SIZE:
                memo.clear()
            for i, owner in zip(unknown, self._owners[slot].tolist(), strict=True):
                owners[i] = owner
                if len(memo) < OWNER_MEMO_SIZE:
                    memo[keys[i]] = owner
        return owners

    def shard_indices(self, keys: Iterable[str]) -> np.ndarray:
        """``owners`` as an array."""
        return np.asarray(self.owners(keys), dtype=np.int64)

    def shard_for(self, key: str) -> str:
        return self.shards[self.owners([key])[0]]
