"""Memory planner (``python -m export plan``): raw embedding arithmetic, shards for a given memory per
shard, and ``--measure``: real bytes per embedding from ``MEMORY USAGE`` in a real Redis (``--redis``;
``python -m stack plan`` runs the same command against a throw-away redis-server).

Units are decimal (1 GB = 1e9 bytes), as in the reference table. Shards = ceil(bytes / usable), with
usable = shard memory x max fill: Redis needs headroom for the copy-on-write of a fork (BGSAVE, full
replica sync), fragmentation and growth.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np
from redis.asyncio import Redis

from orchestrator import schema
from orchestrator.store import keys
from orchestrator.store.codec import DTYPES, EmbeddingCodec
from orchestrator.store.features import encode_rows

# The reference sizing table (raw arithmetic, 4-byte floats): name, users, items, dim, total, shards.
REFERENCE: tuple[tuple[str, int, int, int, str, str], ...] = (
    ("Small", 1_000_000, 100_000, 128, "~560 MB", "1"),
    ("Medium", 10_000_000, 1_000_000, 128, "~5.6 GB", "2-4"),
    ("Large", 100_000_000, 10_000_000, 128, "~56 GB", "8-16"),
    ("Massive", 1_000_000_000, 100_000_000, 256, "~1.1 TB", "64-128"),
)


@dataclass(frozen=True)
class PlanInput:
    users: int
    items: int
    dim: int
    dtype: str = "fp32"
    shard_memory_gb: float = 8.0
    """Memory of one Redis shard (maxmemory), decimal GB."""
    max_fill: float = 0.6
    """Fraction of a shard's memory the data may use."""

    def validate(self) -> None:
        if self.users < 0 or self.items < 0 or self.dim < 1:
            raise ValueError(f"users and items must be >= 0 and dim >= 1, got {self.users}, {self.items}, {self.dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.shard_memory_gb <= 0 or not 0 < self.max_fill <= 1:
            raise ValueError(
                f"shard_memory_gb must be > 0 and max_fill in (0, 1], got {self.shard_memory_gb}, {self.max_fill}"
            )

    @property
    def entities(self) -> int:
        return self.users + self.items

    @property
    def usable_bytes(self) -> float:
        return self.shard_memory_gb * 1e9 * self.max_fill


def human(n_bytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{n_bytes:.0f} B"


def raw_bytes(spec: PlanInput) -> int:
    return spec.entities * spec.dim * DTYPES[spec.dtype][1].itemsize


def shards_for(total_bytes: float, spec: PlanInput) -> int:
    return max(1, math.ceil(total_bytes / spec.usable_bytes))


def plan(spec: PlanInput, measured_bytes_per_entity: float | None = None) -> dict[str, object]:
    spec.validate()
    raw = raw_bytes(spec)
    result: dict[str, object] = {
        "users": spec.users,
        "items": spec.items,
        "dim": spec.dim,
        "dtype": spec.dtype,
        "raw_bytes": raw,
        "raw": human(raw),
        "shard_memory_gb": spec.shard_memory_gb,
        "max_fill": spec.max_fill,
        "shards": shards_for(raw, spec),
        "measured_bytes_per_entity": measured_bytes_per_entity,
    }
    if measured_bytes_per_entity is not None:
        measured = measured_bytes_per_entity * spec.entities
        result |= {
            "measured_bytes": round(measured),
            "measured": human(measured),
            "overhead_vs_raw": round(measured / raw, 3) if raw else None,
            "shards": shards_for(measured, spec),
            "shards_raw": shards_for(raw, spec),
        }
    return result


def reference_rows(
    shard_memory_gb: float = 8.0, max_fill: float = 0.6, measured: dict[int, float] | None = None
) -> list[dict[str, object]]:
    """The reference table recomputed; ``measured`` maps dim -> measured bytes per fp32 entity."""
    rows = []
    for name, users, items, dim, total, shards in REFERENCE:
        spec = PlanInput(users, items, dim, "fp32", shard_memory_gb, max_fill)
        row = plan(spec, (measured or {}).get(dim))
        rows.append({"scale": name, "reference_total": total, "reference_shards": shards} | row)
    return rows


def markdown_table(rows: list[dict[str, object]]) -> list[str]:
    lines = [
        "| Scale | Users | Items | Dim | Raw (ours) | Reference | Measured "
        "| Shards raw / measured | Reference shards |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        measured = r.get("measured", "-")
        shards = f"{r.get('shards_raw', r['shards'])} / {r['shards'] if 'measured' in r else '-'}"
        lines.append(
            f"| {r['scale']} | {r['users']:,} | {r['items']:,} | {r['dim']} | {r['raw']} | {r['reference_total']} "
            f"| {measured} | {shards} | {r['reference_shards']} |"
        )
    return lines


async def measure_bytes_per_entity(url: str, dim: int, dtype: str, sample: int = 20_000) -> dict[str, float]:
    """Load ``sample`` embeddings with the real key layout and codec; read MEMORY USAGE per key and the
    INFO used_memory delta. Cleans up after itself (SCAN + UNLINK of its own version prefix)."""
    codec = EmbeddingCodec(dim, dtype)
    version = f"plan-measure-{dtype}-{dim}"
    client = Redis.from_url(url)
    try:
        before = int((await client.info("memory"))["used_memory"])
        rng = np.random.default_rng(0)
        names: list[str] = []
        for start in range(0, sample, 5000):
            n = min(5000, sample - start)
            ids = [str(10_000_000 + start + i) for i in range(n)]
            chunk = keys.embeddings(version, "user", ids)
            values = codec.encode(rng.normal(size=(n, dim)).astype(np.float32))
            await client.mset(dict(zip(chunk, values, strict=True)))
            names.extend(chunk)
        after = int((await client.info("memory"))["used_memory"])
        pipe = client.pipeline(transaction=False)
        probe = names[:: max(1, len(names) // 2000)]
        for name in probe:
            pipe.memory_usage(name, samples=0)
        usage = [int(u) for u in await pipe.execute()]
        return {
            "memory_usage_per_key": float(np.mean(usage)),
            "used_memory_delta_per_key": (after - before) / sample,
            "value_bytes": float(codec.value_bytes),
            "raw_bytes": float(dim * DTYPES[dtype][1].itemsize),
        }
    finally:
        async for batch in _scan_batches(client, keys.version_pattern(version)):
            await client.unlink(*batch)
        await client.aclose()


async def _scan_batches(client: Redis, pattern: str):  # type: ignore[no-untyped-def]
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            yield batch
            batch = []
    if batch:
        yield batch


def measure(url: str, dim: int, dtype: str, sample: int = 20_000) -> dict[str, float]:
    """``measure_bytes_per_entity`` against the Redis at ``url`` (``python -m stack plan`` starts a
    throw-away redis-server and passes its URL)."""
    return asyncio.run(measure_bytes_per_entity(url, dim, dtype, sample))


async def measure_small_values(
    url: str, user_ids: list[str], version: str = "plan-measure", recs_version: str | None = None
) -> dict[str, float]:
    """MEMORY USAGE of a 3-field user feature row packed (int32, as stored, under data version ``version``)
    vs a hash, and the mean of the stored top-N lists of ``user_ids[:200]`` (those of model version
    ``recs_version``; 0 when none is stored)."""
    client = Redis.from_url(url)
    try:
        row = np.array([[3, 2, 15]])
        packed_key, hash_key = keys.features(version, "user", "1"), f"{version}-hash:{{u:1}}"
        await client.set(packed_key, encode_rows("user", row)[0])
        await client.hset(
            hash_key, mapping={name: int(v) for (name, _), v in zip(schema.USER_FEATURES, row[0], strict=True)}
        )
        packed = await client.memory_usage(packed_key, samples=0)
        hashed = await client.memory_usage(hash_key, samples=0)
        await client.unlink(packed_key, hash_key)
        recs = [await client.memory_usage(keys.recs(u, recs_version), samples=0) for u in user_ids[:200]]
        present = [r for r in recs if r]
        return {
            "feature_row_packed": float(packed or 0),
            "feature_row_hash": float(hashed or 0),
            "precomputed_list": float(np.mean(present)) if present else 0.0,
        }
    finally:
        await client.aclose()
