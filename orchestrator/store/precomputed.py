"""``PrecomputedStore`` on any ``Backend``: offline top-N per user and per-segment popular lists.

Values are JSON (items, scores, model_version, computed_at): read once per fallback, small, and
readable with redis-cli during an incident. A store given a model version reads and writes that version's
lists (``m:<version>:rec:{u:<id>}``): a version's lists are computed before it becomes active, serve
only while it is, and go when it is retired. Popular lists are not versioned (the last resort).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from orchestrator import schema
from orchestrator.store import Recommendations, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.errors import CorruptValueError, ShapeError, StoreConfigError

_FIELDS = ("items", "scores", "model_version", "computed_at")


def encode(recs: Recommendations) -> bytes:
    if len(recs.items) != len(recs.scores):
        raise ShapeError("recommendations", f"one score per item ({len(recs.items)})", f"{len(recs.scores)} scores")
    return orjson.dumps(
        {
            "items": list(recs.items),
            # Six decimals: scores only order the list; full doubles would double its size in Redis.
            "scores": [round(float(s), 6) for s in recs.scores],
            "model_version": recs.model_version,
            "computed_at": recs.computed_at,
            "extra": dict(recs.extra),
        }
    )


def decode(key: str, raw: bytes) -> Recommendations:
    try:
        value = orjson.loads(raw)
        missing = [f for f in _FIELDS if f not in value]
    except (orjson.JSONDecodeError, TypeError):
        raise CorruptValueError(key, f"a JSON object with {', '.join(_FIELDS)}", repr(raw[:40])) from None
    if missing:
        raise CorruptValueError(key, f"a JSON object with {', '.join(_FIELDS)}", f"no {', '.join(missing)}")
    if len(value["items"]) != len(value["scores"]):
        raise CorruptValueError(
            key, "one score per item", f"{len(value['items'])} items, {len(value['scores'])} scores"
        )
    return Recommendations(
        tuple(value["items"]),
        tuple(value["scores"]),
        str(value["model_version"]),
        float(value["computed_at"]),
        dict(value.get("extra", {})),
    )


def check_segment(segment: str) -> str:
    if segment not in schema.SEGMENTS:
        raise StoreConfigError("segment", f"must be one of {list(schema.SEGMENTS)}", segment)
    return segment


class RedisPrecomputedStore:
    def __init__(self, backend: Backend, version: str | None = None) -> None:
        self.backend = backend
        self.version = None if version is None else keys.check_version(version)

    def at(self, version: str) -> RedisPrecomputedStore:
        """The same store, reading and writing ``version``'s lists."""
        return RedisPrecomputedStore(self.backend, version)

    async def get_recs(self, user_ids: Sequence[str]) -> list[Recommendations | None]:
        names = [keys.recs(u, self.version) for u in user_ids]
        replies = await self.backend.execute([Command("GET", k) for k in names])
        return [None if raw is None else decode(k, raw) for k, raw in zip(names, replies.values, strict=True)]

    async def set_recs(self, recs: Mapping[str, Recommendations], ttl_s: int) -> None:
        if ttl_s < 1:
            raise StoreConfigError("ttl_s", "must be an integer >= 1", ttl_s)
        commands = [Command("SET", keys.recs(u, self.version), (encode(r), "EX", ttl_s)) for u, r in recs.items()]
        (await self.backend.execute(commands)).raise_if_down(f"set_recs({len(commands)} users)")

    async def get_popular(self, segment: str) -> Recommendations | None:
        key = keys.popular(check_segment(segment))
        replies = await self.backend.execute([Command("GET", key)])
        # A shard that did not answer is not a missing list: callers keep what they had.
        replies.raise_if_down(f"get_popular({segment})")
        raw = replies.values[0]
        return None if raw is None else decode(key, raw)

    async def set_popular(self, segment: str, recs: Recommendations) -> None:
        key = keys.popular(check_segment(segment))
        (await self.backend.execute([Command("SET", key, (encode(recs),))])).raise_if_down("set_popular")
