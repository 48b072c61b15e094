"""Memory planner (``python -m export plan``): raw embedding arithmetic, shards for a given memory per
shard, and ``--measure``: real bytes per embedding from ``MEMORY USAGE`` in a real Redis (``--redis``;
``python -m stack plan`` runs the same command against a throw-away redis-server), and
``measure_key_kinds``: every key kind of the data plane (embeddings, feature rows, seen sets, pre-computed
lists, cached lists) written at any scale in pipelined chunks and measured per kind; ``python -m bench
--only redis`` runs it at 1M users x 1M items and sets the result against the capacity plan.

Units are decimal (1 GB = 1e9 bytes), as in the reference table. Shards = ceil(bytes / usable), with
usable = shard memory x max fill: Redis needs headroom for the copy-on-write of a fork (BGSAVE, full
replica sync), fragmentation and growth.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

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


# --- every key kind at scale -----------------------------------------------------------------------

# The data plane's per-user and per-item key kinds, in the order ``measure_key_kinds`` writes them. What each
# holds, as the service and the offline jobs write it:
#   user_embedding, item_embedding  m:<v>:emb:<kind>:{..}  the codec's packed vector (fp32 or fp16)
#   user_features, item_features    m:<v>:feat:<kind>:{..} packed int32 feature row
#   seen                            seen:{u:..}            set of the item ids in the user's history
#   precomputed                     m:<v>:rec:{u:..}       JSON top-N (items, scores, model_version, computed_at), TTL
#   cache_entry                     rc:{u:..}              hash, one field per cached context: the JSON top-100, TTL
KEY_KINDS: tuple[str, ...] = (
    "user_embedding",
    "item_embedding",
    "user_features",
    "item_features",
    "seen",
    "precomputed",
    "cache_entry",
)


@dataclass(frozen=True)
class FillSpec:
    """What ``measure_key_kinds`` writes: the data of ``users`` x ``items`` in the project's own key layout,
    values and codecs, with synthetic contents of the real sizes.

    Ids are decimal numbers as in MovieLens and the synthetic data set (Redis keeps a set of such ids as an
    intset: non-numeric ids cost several times more per seen item). History lengths follow the synthetic
    generator (export/data.py): lognormal around ``history_median`` with ``history_sigma``, at least
    ``history_min``, at most half the catalogue.
    """

    users: int
    items: int
    dim: int = 128
    dtype: str = "fp16"
    top_n: int = 50
    """Items per pre-computed list (the pre-compute job's top-N)."""
    cached_users: int = 0
    """Users with a cached list in Redis (one context each): the cache's share of the user base."""
    cache_list_length: int = 100
    """Items per cached list (RankingSettings.list_length)."""
    history_median: float = 100.0
    history_sigma: float = 0.6
    history_min: int = 20
    chunk: int = 10_000
    """Keys per pipelined write: the fill streams, nothing holds more than one chunk."""
    id_space: int = 0
    """Ids spread over 1..id_space (0: as many as there are entities), and item ids drawn from 1..id_space:
    a sample for a larger catalogue uses that catalogue's id widths, on which sizes depend (a set of ids up
    to 32,767 is an intset of 2-byte integers, 4 bytes beyond; JSON lists grow with the digits)."""
    version: str = "scale-v1-measure"
    seed: int = 0

    def validate(self) -> None:
        if self.users < 1 or self.items < 2 or self.dim < 1:
            raise ValueError(
                f"users >= 1, items >= 2 and dim >= 1 required, got {self.users}, {self.items}, {self.dim}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.cached_users <= self.users:
            raise ValueError(f"cached_users must lie in 0..users ({self.users}), got {self.cached_users}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {self.chunk}")
        if self.id_space and self.id_space < max(self.users, self.items):
            raise ValueError(
                f"id_space must be 0 or >= users and items ({max(self.users, self.items)}), got {self.id_space}"
            )

    def ids(self, n: int) -> list[str]:
        """``n`` distinct decimal ids spread evenly over 1..id_space."""
        stride = max(1, (self.id_space or n) // n)
        return [str(1 + i * stride) for i in range(n)]

    @property
    def item_id_space(self) -> int:
        return self.id_space or self.items

    def history_lengths(self, rng: np.random.Generator, n: int) -> np.ndarray:
        lengths = rng.lognormal(np.log(self.history_median), self.history_sigma, size=n).astype(np.int64)
        return np.clip(lengths, self.history_min, max(self.history_min, self.item_id_space // 2))


@dataclass
class KindMeasurement:
    """One key kind as measured: how many keys, the INFO used_memory it added, MEMORY USAGE of a sample."""

    keys: int
    used_memory_delta: int
    memory_usage_mean: float
    seconds: float

    @property
    def bytes_per_key(self) -> float:
        return self.used_memory_delta / self.keys if self.keys else 0.0


@dataclass
class ScaleMeasurement:
    spec: FillSpec
    baseline_used_memory: int
    used_memory: int
    kinds: dict[str, KindMeasurement]
    mean_history: float
    redis_version: str

    @property
    def data_bytes(self) -> int:
        """used_memory minus what the empty server used: the data set's own memory."""
        return self.used_memory - self.baseline_used_memory


async def measure_key_kinds(
    url: str,
    spec: FillSpec,
    progress: bool = True,
    probe: int = 2000,
    kinds: tuple[str, ...] = KEY_KINDS,
    isolate: bool = False,
) -> ScaleMeasurement:
    """Write ``kinds`` of ``spec`` into the scratch Redis at ``url`` in chunks, one kind after another,
    reading INFO used_memory after each kind and MEMORY USAGE of ``probe`` keys of it.

    ``isolate`` (for per-key figures from a sample): FLUSHALL before each kind, so that each kind's
    used_memory delta holds its own keys and its own share of the key table; else a kind that happens to
    grow Redis's key table past a power of two is charged for every key before it. Without ``isolate``
    the data stays for the caller to read (the caller owns the server: ``python -m bench --only redis``
    deletes it with the server). The server must be a scratch one: ``isolate`` empties it.
    """
    unknown = sorted(set(kinds) - set(KEY_KINDS))
    if unknown:
        raise ValueError(f"kinds must be among {list(KEY_KINDS)}, got {unknown}")
    from tqdm import tqdm

    from export.dataplane import sharded_backend
    from orchestrator.cache import CachedList
    from orchestrator.store import Recommendations
    from orchestrator.store.backend import Command
    from orchestrator.store.embeddings import RedisEmbeddingStore
    from orchestrator.store.features import RedisFeatureStore
    from orchestrator.store.precomputed import RedisPrecomputedStore
    from orchestrator.store.versions import VersionInfo

    spec.validate()
    rng = np.random.default_rng(spec.seed)
    backend = sharded_backend([url], timeout_ms=60_000)
    client = Redis.from_url(url)
    info = VersionInfo(spec.version, spec.dim, spec.dtype)
    embeddings = RedisEmbeddingStore(backend, info)
    features = RedisFeatureStore(backend, spec.version)
    precomputed = RedisPrecomputedStore(backend, spec.version)
    user_ids, item_ids = spec.ids(spec.users), spec.ids(spec.items)
    n_user_features, n_item_features = len(schema.USER_FEATURES), len(schema.ITEM_FEATURES)
    history_total = 0
    now = time.time()

    def chunks(n: int) -> list[tuple[int, int]]:
        return [(lo, min(n, lo + spec.chunk)) for lo in range(0, n, spec.chunk)]

    def scores(n: int) -> list[float]:
        return sorted((rng.random(n) * 4 - 2).tolist(), reverse=True)

    async def user_embedding(lo: int, hi: int) -> None:
        await embeddings.set_batch("user", user_ids[lo:hi], rng.normal(size=(hi - lo, spec.dim)).astype(np.float32))

    async def item_embedding(lo: int, hi: int) -> None:
        await embeddings.set_batch("item", item_ids[lo:hi], rng.normal(size=(hi - lo, spec.dim)).astype(np.float32))

    async def user_features(lo: int, hi: int) -> None:
        await features.set_rows("user", user_ids[lo:hi], rng.integers(0, 20, size=(hi - lo, n_user_features)))

    async def item_features(lo: int, hi: int) -> None:
        await features.set_rows("item", item_ids[lo:hi], rng.integers(0, 20, size=(hi - lo, n_item_features)))

    async def seen(lo: int, hi: int) -> None:
        nonlocal history_total
        lengths = spec.history_lengths(rng, hi - lo)
        history_total += int(lengths.sum())
        picks = rng.integers(1, spec.item_id_space + 1, size=int(lengths.sum()))
        parts = np.split(picks.astype(np.bytes_), np.cumsum(lengths)[:-1])
        # What RedisFeatureStore.add_seen sends (one SADD per user), with the ids as bytes: redis-py packs
        # bytes without re-encoding, and 120 million members are most of the fill's time.
        commands = [
            Command("SADD", keys.seen(u), tuple(part.tolist())) for u, part in zip(user_ids[lo:hi], parts, strict=True)
        ]
        (await backend.execute(commands)).raise_if_down("write seen sets")

    def top(n: int) -> tuple[str, ...]:
        # Drawn with replacement (a repeat among 50 of 1M items is rare and changes no size): choice without
        # replacement would shuffle the whole catalogue per user.
        return tuple(rng.integers(1, spec.item_id_space + 1, size=n).astype(str).tolist())

    async def precomputed_lists(lo: int, hi: int) -> None:
        recs = {
            u: Recommendations(top(spec.top_n), tuple(scores(spec.top_n)), spec.version, now) for u in user_ids[lo:hi]
        }
        await precomputed.set_recs(recs, ttl_s=7 * 86_400)

    async def cache_entries(lo: int, hi: int) -> None:
        # As LayeredCache.set writes them: HSET of the "<version>|<page>|<device>" field, then EXPIRE.
        commands = []
        for u in user_ids[lo:hi]:
            value = CachedList(top(spec.cache_list_length), tuple(scores(spec.cache_list_length)), spec.version, 0)
            key = keys.rec_cache(u)
            commands += [
                Command("HSET", key, (f"{spec.version}|home|web", value.encode())),
                Command("EXPIRE", key, (300,)),
            ]
        (await backend.execute(commands)).raise_if_down("write cache entries")

    plan_of: list[tuple[str, int, Any, Any]] = [
        ("user_embedding", spec.users, user_embedding, lambda i: keys.embedding(spec.version, "user", user_ids[i])),
        ("item_embedding", spec.items, item_embedding, lambda i: keys.embedding(spec.version, "item", item_ids[i])),
        ("user_features", spec.users, user_features, lambda i: keys.features(spec.version, "user", user_ids[i])),
        ("item_features", spec.items, item_features, lambda i: keys.features(spec.version, "item", item_ids[i])),
        ("seen", spec.users, seen, lambda i: keys.seen(user_ids[i])),
        ("precomputed", spec.users, precomputed_lists, lambda i: keys.recs(user_ids[i], spec.version)),
        ("cache_entry", spec.cached_users, cache_entries, lambda i: keys.rec_cache(user_ids[i])),
    ]
    try:
        server = await client.info("server")
        baseline = int((await client.info("memory"))["used_memory"])
        measured: dict[str, KindMeasurement] = {}
        before = baseline
        total = sum(n for kind, n, _, _ in plan_of if kind in kinds)
        with tqdm(
            total=total, desc=f"fill {spec.users:,} users x {spec.items:,} items", unit="key", disable=not progress
        ) as bar:
            for kind, n, write, key_of in plan_of:
                if kind not in kinds:
                    continue
                if isolate:
                    await client.flushall()
                    before = int((await client.info("memory"))["used_memory"])
                started = time.perf_counter()
                for lo, hi in chunks(n):
                    await write(lo, hi)
                    bar.update(hi - lo)
                seconds = time.perf_counter() - started
                after = int((await client.info("memory"))["used_memory"])
                sample = [key_of(int(i)) for i in np.linspace(0, n - 1, num=min(probe, n)).astype(int)] if n else []
                pipe = client.pipeline(transaction=False)
                for name in sample:
                    pipe.memory_usage(name, samples=0)
                usage = [int(u or 0) for u in await pipe.execute()] if sample else []
                measured[kind] = KindMeasurement(n, after - before, float(np.mean(usage)) if usage else 0.0, seconds)
                before = after
        return ScaleMeasurement(
            spec, baseline, before, measured, history_total / max(1, spec.users), str(server.get("redis_version"))
        )
    finally:
        await client.aclose()
        await backend.aclose()
