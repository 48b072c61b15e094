"""The catalogue's hot rows in process memory: item embeddings and feature rows of one model version.

A cache miss reads its 200 candidates' embeddings and feature rows: 400 Redis GETs whose packing, parsing
and decoding took about a third of the orchestrator's CPU per miss (py-spy over `python -m bench --only
service`'s miss traffic), and most of Redis's. Item rows are written once per model version under keys
that name the version, and nothing updates them in place, so a row read once is the row for as long as
its version serves: the store views of one version keep what they read here, in a bounded LRU. A row also
has a lifetime, which bounds how long a loader rerun that rewrote a version's rows could leave this
process on the old ones. User rows are not kept: each user's are read by few requests, and change.

Rows are held in one array per store (a slot per id), so that a batch of hits is one fancy-indexed copy.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import compress, repeat

import numpy as np

from orchestrator import metrics
from orchestrator.store import EmbeddingStore, FeatureStore, Kind, Lookup, SessionEvent

_FIRST_SLOTS = 1024


class LocalRows:
    """Fixed-width rows by id: at most ``capacity``, the least recently read evicted first, each kept
    ``ttl_s`` after it was stored."""

    def __init__(self, capacity: int, ttl_s: float, layer: str, clock: Callable[[], float] = time.monotonic) -> None:
        """``layer`` labels the rows' hits and misses in recserve_cache_hits_total / recserve_cache_misses_total."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._hits, self._misses = metrics.CACHE_HITS.labels(layer), metrics.CACHE_MISSES.labels(layer)
        self.clock = clock
        self._slots: OrderedDict[str, int] = OrderedDict()  # id -> slot, least recently read first
        self._rows: np.ndarray | None = None  # [slots, width], grown by doubling up to capacity
        self._born = np.empty(0, dtype=np.float64)
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    def read(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The mask of ``ids`` held and alive, and their rows (a copy, in the order of the mask's hits)."""
        slots = np.fromiter(map(self._slots.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
        hit = slots >= 0
        if hit.any():
            hit[hit] = self._born[slots[hit]] >= self.clock() - self.ttl_s
        deque(map(self._slots.move_to_end, compress(ids, hit.tolist())), maxlen=0)  # most recently read last
        n_hits = int(hit.sum())
        self._hits.inc(n_hits)
        self._misses.inc(len(ids) - n_hits)
        if self._rows is None or not n_hits:
            return hit, np.empty((0, 0))
        return hit, self._rows[slots[hit]]

    def store(self, ids: Sequence[str], rows: np.ndarray) -> None:
        """Keep ``rows`` (one per id) as of now; an id held already gets the new row."""
        if not len(ids):
            return
        rows = np.asarray(rows)
        if self._rows is None or self._rows.shape[1:] != rows.shape[1:] or self._rows.dtype != rows.dtype:
            self._reset(rows)
        slots = np.fromiter((self._slot_for(i) for i in ids), dtype=np.int64, count=len(ids))
        assert self._rows is not None
        self._rows[slots] = rows
        self._born[slots] = self.clock()

    def drop(self, ids: Sequence[str]) -> None:
        for key in ids:
            slot = self._slots.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    def _reset(self, like: np.ndarray) -> None:
        size = min(self.capacity, _FIRST_SLOTS)
        self._rows = np.empty((size, *like.shape[1:]), dtype=like.dtype)
        self._born = np.zeros(size, dtype=np.float64)
        self._slots.clear()
        self._free = list(range(size - 1, -1, -1))

    def _slot_for(self, key: str) -> int:
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        if not self._free:
            if self._rows is not None and len(self._rows) < self.capacity:
                self._grow()
            else:
                _, evicted = self._slots.popitem(last=False)
                self._free.append(evicted)
        slot = self._free.pop()
        self._slots[key] = slot
        return slot

    def _grow(self) -> None:
        assert self._rows is not None
        old = len(self._rows)
        size = min(self.capacity, 2 * old)
        rows = np.empty((size, *self._rows.shape[1:]), dtype=self._rows.dtype)
        rows[:old] = self._rows
        born = np.zeros(size, dtype=np.float64)
        born[:old] = self._born
        self._rows, self._born = rows, born
        self._free.extend(range(size - 1, old - 1, -1))


async def read_through(rows: LocalRows, ids: Sequence[str], fetch: Callable[[list[str]], Awaitable[Lookup]]) -> Lookup:
    """``fetch``'s Lookup for ``ids``, asking it only for the rows ``rows`` does not hold, and keeping what it
    found. Rows that were not found or whose shard did not answer are not kept: they are asked again."""
    hit, held = rows.read(ids)
    if not hit.any():
        lookup = await fetch(list(ids))
        _keep_found(rows, ids, lookup)
        return lookup
    if hit.all():
        n = len(ids)
        return Lookup(held, np.ones(n, dtype=bool), np.zeros(n, dtype=bool))
    missing = list(compress(ids, (~hit).tolist()))
    # ``held`` was copied before this await: rows stored meanwhile may have taken the hits' slots.
    fetched = await fetch(missing)
    _keep_found(rows, missing, fetched)
    matrix = np.empty((len(ids), *fetched.matrix.shape[1:]), dtype=fetched.matrix.dtype)
    matrix[hit], matrix[~hit] = held, fetched.matrix
    found, unavailable = hit.copy(), np.zeros(len(ids), dtype=bool)
    found[~hit], unavailable[~hit] = fetched.found, fetched.unavailable
    return Lookup(matrix, found, unavailable, fetched.down, fetched.timed_out)


def _keep_found(rows: LocalRows, ids: Sequence[str], lookup: Lookup) -> None:
    rows.store(list(compress(ids, lookup.found.tolist())), lookup.matrix[lookup.found])


class LocalItemEmbeddings:
    """``EmbeddingStore`` whose item reads go through a ``LocalRows`` first; user reads go straight through."""

    def __init__(self, inner: EmbeddingStore, rows: LocalRows) -> None:
        self.inner = inner
        self.rows = rows

    async def get_batch(self, kind: Kind, ids: Sequence[str]) -> Lookup:
        if kind != "item":
            return await self.inner.get_batch(kind, ids)
        return await read_through(self.rows, ids, lambda missing: self.inner.get_batch(kind, missing))

    async def set_batch(self, kind: Kind, ids: Sequence[str], matrix: np.ndarray) -> None:
        if kind == "item":
            self.rows.drop(ids)
        await self.inner.set_batch(kind, ids, matrix)


class LocalItemFeatures:
    """``FeatureStore`` whose item feature rows go through a ``LocalRows`` first; everything else goes
    straight through."""

    def __init__(self, inner: FeatureStore, rows: LocalRows) -> None:
        self.inner = inner
        self.rows = rows

    async def get_rows(self, kind: Kind, ids: Sequence[str]) -> Lookup:
        if kind != "item":
            return await self.inner.get_rows(kind, ids)
        return await read_through(self.rows, ids, lambda missing: self.inner.get_rows(kind, missing))

    async def set_rows(self, kind: Kind, ids: Sequence[str], rows: np.ndarray) -> None:
        if kind == "item":
            self.rows.drop(ids)
        await self.inner.set_rows(kind, ids, rows)

    async def recent_events(self, user_id: str, limit: int) -> list[SessionEvent]:
        return await self.inner.recent_events(user_id, limit)

    async def add_event(self, user_id: str, event: SessionEvent) -> None:
        await self.inner.add_event(user_id, event)

    async def seen(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        return await self.inner.seen(user_ids)

    async def add_seen(self, seen: Mapping[str, Sequence[str]], ttl_s: int | None = None) -> None:
        await self.inner.add_seen(seen, ttl_s)
