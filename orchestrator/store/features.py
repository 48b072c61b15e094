"""``FeatureStore`` on any ``Backend``.

Feature rows are packed little-endian int32 strings, not hashes: the reader always wants the whole row
as one tensor row, a batch decodes with one ``np.frombuffer``, and it is smaller (measured in
docs/DATA_PLANE.md: 88 vs 120 bytes per 3-field user row by MEMORY USAGE). Hashes would only
pay off if single fields were updated in place, which nothing here does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from orchestrator import schema
from orchestrator.store import Kind, Lookup, SessionEvent, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.errors import CorruptValueError, ShapeError, StoreConfigError

WIDTHS: dict[str, int] = {"user": len(schema.USER_FEATURES), "item": len(schema.ITEM_FEATURES)}
_ROW_DTYPE = np.dtype("<i4")
# Events kept in a user's session list (``sess:``, newest first): the request path reads at most this many.
SESSION_CAP = 50


def encode_rows(kind: Kind, rows: np.ndarray) -> list[bytes]:
    width = WIDTHS[kind]
    values = np.asarray(rows)
    if values.ndim != 2 or values.shape[1] != width:
        raise ShapeError(f"{kind} feature rows", f"shape [n, {width}]", f"shape {list(values.shape)}")
    if values.dtype.kind not in "iu":
        raise ShapeError(f"{kind} feature rows", "an integer dtype", str(values.dtype))
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
        raise ShapeError(f"{kind} feature rows", "vocabulary indices in 0..2^31-1", f"{values.min()}..{values.max()}")
    blob = np.ascontiguousarray(values, dtype=_ROW_DTYPE).tobytes()
    size = width * _ROW_DTYPE.itemsize
    return [blob[k : k + size] for k in range(0, len(blob), size)]


def decode_rows(kind: Kind, names: Sequence[str], values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """int64 [n, width] with 0 (the "unknown" index of every vocabulary) for misses, and the found mask."""
    width = WIDTHS[kind]
    size = width * _ROW_DTYPE.itemsize
    found = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    matrix = np.zeros((len(values), width), dtype=np.int64)
    present = [v for v in values if v is not None]
    for name, value in zip(names, values, strict=True):
        if value is not None and len(value) != size:
            raise CorruptValueError(name, f"{size} bytes ({width} x int32 {kind} features)", f"{len(value)} bytes")
    if present:
        matrix[found] = np.frombuffer(b"".join(present), dtype=_ROW_DTYPE).reshape(-1, width)
    return matrix, found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisFeatureStore:
    def __init__(
        self, backend: Backend, version: str, session_cap: int = SESSION_CAP, session_ttl_s: int = 7 * 86400
    ) -> None:
        if session_cap < 1:
            raise StoreConfigError("session_cap", "must be an integer >= 1", session_cap)
        self.backend = backend
        self.version = keys.check_version(version)
        self.session_cap = session_cap
        self.session_ttl_s = session_ttl_s

    async def get_rows(self, kind: Kind, ids: Sequence[str]) -> Lookup:
        names = [keys.features(self.version, kind, i) for i in ids]
        replies = await self.backend.execute([Command("GET", k) for k in names])
        matrix, found = decode_rows(kind, names, replies.values)
        found &= ~replies.unavailable
        return Lookup(matrix, found, replies.unavailable, replies.down, replies.timed_out)

    async def set_rows(self, kind: Kind, ids: Sequence[str], rows: np.ndarray) -> None:
        if len(ids) != len(rows):
            raise ShapeError("set_rows", f"one row per id ({len(ids)} rows)", f"{len(rows)} rows")
        names = [keys.features(self.version, kind, i) for i in ids]
        commands = [Command("SET", k, (v,)) for k, v in zip(names, encode_rows(kind, rows), strict=True)]
        (await self.backend.execute(commands)).raise_if_down(f"set_rows({kind}, {len(ids)} ids)")

    async def recent_events(self, user_id: str, limit: int) -> list[SessionEvent]:
        replies = await self.backend.execute([Command("LRANGE", keys.session(user_id), (0, limit - 1))])
        replies.raise_if_down("recent_events")
        events = []
        for raw in replies.values[0] or []:
            ts_ms, event, item_id = _text(raw).split("|", 2)
            events.append(SessionEvent(item_id, event, int(ts_ms)))
        return events

    async def add_event(self, user_id: str, event: SessionEvent) -> None:
        if "|" in event.event:
            raise ShapeError("session event name", "no '|'", repr(event.event))
        key = keys.session(user_id)
        # One key, so one shard and one pipeline: push, cap, refresh the TTL.
        replies = await self.backend.execute(
            [
                Command("LPUSH", key, (f"{event.ts_ms}|{event.event}|{event.item_id}",)),
                Command("LTRIM", key, (0, self.session_cap - 1)),
                Command("EXPIRE", key, (self.session_ttl_s,)),
            ]
        )
        replies.raise_if_down("add_event")

    async def seen(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        """Items each user has seen (empty set when none); None where the shard did not answer."""
        replies = await self.backend.execute([Command("SMEMBERS", keys.seen(u)) for u in user_ids])
        return [
            None if down else {_text(v) for v in (value or ())}
            for value, down in zip(replies.values, replies.unavailable.tolist(), strict=True)
        ]

    async def add_seen(self, seen: Mapping[str, Sequence[str]], ttl_s: int | None = None) -> None:
        # SADD is idempotent: a loader rerun or a duplicate event cannot double-count.
        commands = []
        for u, items in seen.items():
            if items:
                commands.append(Command("SADD", keys.seen(u), tuple(items)))
                if ttl_s is not None:
                    commands.append(Command("EXPIRE", keys.seen(u), (ttl_s,)))
        if commands:
            (await self.backend.execute(commands)).raise_if_down(f"add_seen({len(commands)} users)")
