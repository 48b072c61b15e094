"""The data-plane seams: small Protocols, value types, and one module per backend beside them.

Contract shared by every batch read: the result has exactly one row per requested id, in request order;
a miss is reported in ``found`` (its row is NaN for embeddings), never zero-filled silently; a row whose
shard did not answer in time is also not found and is flagged in ``unavailable``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

Kind = Literal["user", "item"]
KINDS: tuple[Kind, ...] = ("user", "item")


@dataclass(frozen=True)
class Lookup:
    """One batch read. Unpacks as ``matrix, found = lookup`` for callers that only need those two."""

    matrix: np.ndarray  # [len(ids), width]
    found: np.ndarray  # bool [len(ids)]
    unavailable: np.ndarray  # bool [len(ids)]: the row's shard did not answer (so found is False too)
    down: tuple[str, ...] = ()  # names of the shards/nodes that did not answer
    timed_out: tuple[str, ...] = ()  # of ``down``, those that missed their deadline (rather than refused)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.matrix, self.found))


@dataclass(frozen=True)
class Recommendations:
    """A ranked list as stored: best first, with where it came from."""

    items: tuple[str, ...]
    scores: tuple[float, ...]
    model_version: str
    computed_at: float  # unix seconds
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionEvent:
    item_id: str
    event: str  # "view", "click", "purchase", ...
    ts_ms: int


class EmbeddingStore(Protocol):
    """Vectors per (kind, id) for one model version; float32 out, whatever the storage dtype."""

    async def get_batch(self, kind: Kind, ids: Sequence[str]) -> Lookup: ...

    async def set_batch(self, kind: Kind, ids: Sequence[str], matrix: np.ndarray) -> None: ...


class FeatureStore(Protocol):
    """Feature rows (int64, ``orchestrator.schema`` widths), session events and seen sets."""

    async def get_rows(self, kind: Kind, ids: Sequence[str]) -> Lookup: ...

    async def set_rows(self, kind: Kind, ids: Sequence[str], rows: np.ndarray) -> None: ...

    async def recent_events(self, user_id: str, limit: int) -> list[SessionEvent]: ...

    async def add_event(self, user_id: str, event: SessionEvent) -> None: ...

    async def seen(self, user_ids: Sequence[str]) -> list[set[str] | None]: ...

    async def add_seen(self, seen: Mapping[str, Sequence[str]], ttl_s: int | None = None) -> None:
        """Union ``seen`` into each user's seen set; with ``ttl_s``, (re)set each touched set's expiry."""
        ...


class PrecomputedStore(Protocol):
    """Offline top-N per user (with a TTL) and the per-segment popular lists (no TTL: last resort)."""

    async def get_recs(self, user_ids: Sequence[str]) -> list[Recommendations | None]: ...

    async def set_recs(self, recs: Mapping[str, Recommendations], ttl_s: int) -> None: ...

    async def get_popular(self, segment: str) -> Recommendations | None: ...

    async def set_popular(self, segment: str, recs: Recommendations) -> None: ...
