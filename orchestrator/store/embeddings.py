"""``EmbeddingStore`` on any ``Backend``: one GET per id, grouped per shard by the backend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orchestrator.store import Kind, Lookup, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.errors import ShapeError
from orchestrator.store.versions import VersionInfo


class RedisEmbeddingStore:
    def __init__(self, backend: Backend, version: VersionInfo) -> None:
        self.backend = backend
        self.version = version
        self.codec = version.codec

    async def get_batch(self, kind: Kind, ids: Sequence[str]) -> Lookup:
        names = keys.embeddings(self.version.version, kind, list(ids))
        replies = await self.backend.execute([Command("GET", k) for k in names])
        matrix, found = self.codec.decode(names, replies.values)
        found &= ~replies.unavailable
        return Lookup(matrix, found, replies.unavailable, replies.down, replies.timed_out)

    async def set_batch(self, kind: Kind, ids: Sequence[str], matrix: np.ndarray) -> None:
        if len(ids) != len(matrix):
            raise ShapeError("set_batch", f"one row per id ({len(ids)} rows)", f"{len(matrix)} rows")
        values = self.codec.encode(matrix)
        names = keys.embeddings(self.version.version, kind, list(ids))
        replies = await self.backend.execute([Command("SET", k, (v,)) for k, v in zip(names, values, strict=True)])
        replies.raise_if_down(f"set_batch({kind}, {len(ids)} ids)")
