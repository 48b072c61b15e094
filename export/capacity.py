"""Capacity plan: how many orchestrator pods, T4 GPUs, Redis shards and FAISS replicas a load needs.

Every per-unit figure comes from a measurement file (``docs/measurements.json``, written by the
benchmarks; each value carries its ``source``), never from a constant in this module. What cannot be
measured on the development machines is an explicit, named assumption in that file (the T4's speed-up
over a CPU Triton instance). The Redis bytes per entity come from the memory planner's measured figure
(``build/bench/plan_measured.json``) when it exists, else from raw arithmetic times a stated overhead.

The arithmetic is the same for any inputs: fed the figures the reference plan implies
(:func:`reference_case`), it reproduces the reference plan (20 x 8 CPU API servers, 8 T4s, 16 Redis
shards x 32 GB, 4 FAISS replicas x 64 GB); fed our measurements, it gives our plan. docs/CAPACITY.md
compares the two point by point.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from export.artifacts import BUILD_DIR, REPO_ROOT

MEASUREMENTS_PATH = REPO_ROOT / "docs" / "measurements.json"
PLAN_MEASURED_PATH = BUILD_DIR / "bench" / "plan_measured.json"
GB = 1e9

# Keys the plan reads from the measurement file; each is documented there with its unit and source.
REQUIRED_MEASUREMENTS: tuple[str, ...] = (
    "orchestrator_rps_per_core_cache_hit",
    "orchestrator_rps_per_core_cache_miss",
    "orchestrator_p99_ms_cache_miss",
    "triton_cpu_rows_per_s",
    "t4_speedup_over_cpu_instance",
    "redis_bytes_per_embedding_128_fp32",
    "redis_bytes_per_feature_row",
    "redis_bytes_per_precomputed_list",
    "redis_bytes_per_seen_set",
    "redis_bytes_per_cache_entry",
    "faiss_bytes_per_item",
    "faiss_bytes_per_item_pq",
    "faiss_search_qps_per_core",
)
# Optional: a measured T4 figure replaces the CPU figure x speed-up assumption.
T4_MEASURED_KEY = "triton_t4_rows_per_s"
# Bytes per value of a stored embedding, and the measurement of a stored 128-d one (key and overhead
# included) per storage dtype; fp32's is required, fp16's is read when a plan stores fp16.
EMBEDDING_BYTES = {"fp32": 4, "fp16": 2}
EMBEDDING_MEASUREMENT = {"fp32": "redis_bytes_per_embedding_128_fp32", "fp16": "redis_bytes_per_embedding_128_fp16"}


class CapacityInputError(ValueError):
    """A plan input or measurement file that breaks a stated rule."""

    def __init__(self, what: str, expected: str, found: object) -> None:
        super().__init__(f"{what}: expected {expected}, but found {found!r}")


@dataclass(frozen=True)
class Measurement:
    value: float
    unit: str
    source: str
    provisional: bool


@dataclass(frozen=True)
class Load:
    """The traffic and catalogue to plan for."""

    users: int
    qps: float
    p99_ms: float
    cache_hit_rate: float
    items: int = 50_000_000
    candidates_per_request: int = 200  # rows Triton scores per cache-missing request
    embedding_dim: int = 128
    embedding_dtype: Literal["fp32", "fp16"] = "fp32"  # as stored in Redis (``python -m export load --dtype``)

    def validate(self) -> None:
        if self.users < 1:
            raise CapacityInputError("users", "an integer >= 1", self.users)
        if self.items < 1:
            raise CapacityInputError("items", "an integer >= 1", self.items)
        if self.qps <= 0:
            raise CapacityInputError("qps", "> 0", self.qps)
        if self.p99_ms <= 0:
            raise CapacityInputError("p99_ms", "> 0", self.p99_ms)
        if not 0.0 <= self.cache_hit_rate < 1.0:
            raise CapacityInputError("cache_hit_rate", "a fraction in [0, 1)", self.cache_hit_rate)
        if self.candidates_per_request < 1:
            raise CapacityInputError("candidates_per_request", "an integer >= 1", self.candidates_per_request)
        if self.embedding_dtype not in EMBEDDING_BYTES:
            raise CapacityInputError("embedding_dtype", f"one of {sorted(EMBEDDING_BYTES)}", self.embedding_dtype)


@dataclass(frozen=True)
class Policy:
    """Sizing policy: headroom, unit sizes, placement. Defaults are ours (docs/CAPACITY.md says why)."""

    cpu_target_utilization: float = 0.6  # = the orchestrator HPA target: room for a zone failing over
    gpu_target_utilization: float = 0.7
    cores_per_pod: int = 1  # one uvicorn worker per orchestrator pod (k8s/base/orchestrator)
    cores_per_server: int = 8  # to state pods as the reference's 8-CPU servers
    min_replicas: int = 2  # of anything that serves: survive one loss
    triton_max_batch_rows: int = 1024
    triton_max_queue_delay_ms: float = 5.0
    redis_shard_memory_gb: float = 32.0
    redis_fill: float = 0.75  # maxmemory / node memory: RDB fork copy-on-write + replication buffers
    redis_raw_overhead: float = 1.5  # only when no measured bytes/entity exist (keys, dict, allocator)
    cache_user_fraction: float = 0.2  # users with a live cached response (TTL) at any time
    cache_contexts_per_user: float = 1.0  # cached contexts (page type x device) per such user, one hash field each
    faiss_placement: Literal["in-process", "dedicated"] = "in-process"
    faiss_in_process_max_gb: float = 6.0  # of an orchestrator pod's memory (8 GiB in gpu-t4)
    faiss_replica_memory_gb: float = 64.0  # dedicated placement only
    faiss_cores_per_replica: int = 8  # dedicated placement only

    def validate(self) -> None:
        for name in ("cpu_target_utilization", "gpu_target_utilization", "redis_fill"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise CapacityInputError(name, "a fraction in (0, 1]", value)
        if self.redis_raw_overhead < 1.0:
            raise CapacityInputError("redis_raw_overhead", ">= 1.0", self.redis_raw_overhead)
        if self.min_replicas < 1:
            raise CapacityInputError("min_replicas", "an integer >= 1", self.min_replicas)
        if not 0.0 <= self.cache_user_fraction <= 1.0:
            raise CapacityInputError("cache_user_fraction", "a fraction in [0, 1]", self.cache_user_fraction)
        if self.cache_contexts_per_user < 0:
            raise CapacityInputError("cache_contexts_per_user", ">= 0", self.cache_contexts_per_user)


@dataclass
class Plan:
    load: Load
    policy: Policy
    orchestrator: dict[str, Any] = field(default_factory=dict)
    triton: dict[str, Any] = field(default_factory=dict)
    redis: dict[str, Any] = field(default_factory=dict)
    faiss: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    provisional: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_measurements(path: Path = MEASUREMENTS_PATH) -> dict[str, Measurement]:
    """Read the measurement file; every required key must be present with value, unit and source."""
    if not path.exists():
        raise CapacityInputError(str(path), "a measurement file (run `make bench` or restore docs/)", "nothing")
    raw = json.loads(path.read_text())
    entries = raw.get("measurements")
    if not isinstance(entries, dict):
        raise CapacityInputError(str(path), 'an object with a "measurements" mapping', sorted(raw))
    out: dict[str, Measurement] = {}
    for key, entry in entries.items():
        missing = {"value", "unit", "source"} - set(entry)
        if missing:
            raise CapacityInputError(f"{path}: {key}", "value, unit and source", f"no {sorted(missing)}")
        value = float(entry["value"])
        if value <= 0:
            raise CapacityInputError(f"{path}: {key}", "a value > 0", entry["value"])
        out[key] = Measurement(value, str(entry["unit"]), str(entry["source"]), bool(entry.get("provisional")))
    absent = [k for k in REQUIRED_MEASUREMENTS if k not in out]
    if absent:
        raise CapacityInputError(str(path), f"every key of {list(REQUIRED_MEASUREMENTS)}", f"{absent} missing")
    return out


def planner_bytes_per_entity(path: Path = PLAN_MEASURED_PATH) -> float | None:
    """The memory planner's measured Redis bytes per embedding entity (``plan --json`` output), if any.

    ``measured_bytes_per_entity`` is a number, or a mapping per entity kind (user, item), whose
    largest value is taken: users and items are stored alike, and the larger one is the safe side.
    """
    if not path.exists():
        return None
    measured = json.loads(path.read_text()).get("measured_bytes_per_entity")
    if isinstance(measured, int | float) and measured > 0:
        return float(measured)
    if isinstance(measured, dict) and measured and all(isinstance(v, int | float) for v in measured.values()):
        return float(max(measured.values()))
    raise CapacityInputError(f"{path}: measured_bytes_per_entity", "a number > 0 or {kind: number}", measured)


def _ceil(x: float) -> int:
    # Guard against 15.000000000000002 becoming 16 from float noise.
    return math.ceil(round(x, 9))


def embedding_bytes(
    load: Load, measurements: dict[str, Measurement], policy: Policy, measured_bytes_per_entity: float | None = None
) -> tuple[float, str]:
    """Redis bytes per stored embedding (key and overhead included) and what that figure rests on, best
    evidence first: the memory planner's measurement, a benchmarked figure for the dtype, else raw arithmetic
    (dim x bytes per value) times the stated overhead factor."""
    per_value = EMBEDDING_BYTES[load.embedding_dtype]
    embedding = measurements.get(EMBEDDING_MEASUREMENT[load.embedding_dtype])
    if measured_bytes_per_entity is not None:
        return measured_bytes_per_entity, "measured by the memory planner (plan_measured.json)"
    if embedding is not None and not embedding.provisional:
        # Scaled with the dim: the vector dominates a 128-d value (256 of 430 B in fp16, 512 of 750 in fp32).
        return embedding.value * load.embedding_dim / 128, f"measured: {embedding.source}"
    raw = load.embedding_dim * per_value * policy.redis_raw_overhead
    return raw, f"raw {load.embedding_dim} x {per_value} B x {policy.redis_raw_overhead} overhead (no measurement yet)"


def redis_data_bytes(
    load: Load, measurements: dict[str, Measurement], policy: Policy, measured_bytes_per_entity: float | None = None
) -> tuple[dict[str, float], float, str]:
    """Redis bytes per key kind, the bytes per entity (embedding + feature row) and the embedding's basis.

    Kinds: embeddings and feature rows of every user and item; per user a seen set (the items of the history,
    excluded at serving) and a pre-computed list; per cached user ``cache_contexts_per_user`` cached lists.
    Not counted, being small or bounded: the version pointers and metadata, the per-segment popular lists,
    generation counters (users with an event in the last 30 days), session lists (capped, 7-day TTL), the
    events stream (MAXLEN) and rate-limit buckets (docs/CAPACITY.md).
    """
    m = {k: v.value for k, v in measurements.items()}
    embedding, basis = embedding_bytes(load, measurements, policy, measured_bytes_per_entity)
    feature_row = m["redis_bytes_per_feature_row"]
    cached_lists = load.users * policy.cache_user_fraction * policy.cache_contexts_per_user
    by_kind = {
        "embeddings": (load.users + load.items) * embedding,
        "feature_rows": (load.users + load.items) * feature_row,
        "seen_sets": load.users * m["redis_bytes_per_seen_set"],
        "precomputed_lists": load.users * m["redis_bytes_per_precomputed_list"],
        "cache_entries": cached_lists * m["redis_bytes_per_cache_entry"],
    }
    return by_kind, embedding + feature_row, basis


def plan(
    load: Load,
    measurements: dict[str, Measurement],
    policy: Policy | None = None,
    measured_bytes_per_entity: float | None = None,
) -> Plan:
    """The capacity plan for ``load``; see the module docstring."""
    policy = policy or Policy()
    load.validate()
    policy.validate()
    m = {k: v.value for k, v in measurements.items()}
    result = Plan(load=load, policy=policy)
    result.sources = {k: v.source for k, v in measurements.items()}
    result.provisional = sorted(k for k, v in measurements.items() if v.provisional)

    # Orchestrator: CPU seconds per request, weighted by where requests end (cache or full path).
    hit, miss_rate = load.cache_hit_rate, 1.0 - load.cache_hit_rate
    busy_cores = load.qps * (
        hit / m["orchestrator_rps_per_core_cache_hit"] + miss_rate / m["orchestrator_rps_per_core_cache_miss"]
    )
    cores = busy_cores / policy.cpu_target_utilization
    pods = max(policy.min_replicas, _ceil(cores / policy.cores_per_pod))
    result.orchestrator = {
        "busy_cores": round(busy_cores, 1),
        "cores": round(cores, 1),
        "pods": pods,
        "cores_per_pod": policy.cores_per_pod,
        "servers": max(policy.min_replicas, _ceil(cores / policy.cores_per_server)),
        "cores_per_server": policy.cores_per_server,
    }

    # Triton: only cache misses reach the ranker, each with its candidate rows.
    miss_qps = load.qps * miss_rate
    rows_per_s = miss_qps * load.candidates_per_request
    if T4_MEASURED_KEY in m:
        t4_rows_per_s = m[T4_MEASURED_KEY]
        t4_basis = f"measured ({T4_MEASURED_KEY})"
    else:
        t4_rows_per_s = m["triton_cpu_rows_per_s"] * m["t4_speedup_over_cpu_instance"]
        t4_basis = "assumption: triton_cpu_rows_per_s x t4_speedup_over_cpu_instance"
    gpus = max(policy.min_replicas, _ceil(rows_per_s / (t4_rows_per_s * policy.gpu_target_utilization)))
    rows_per_gpu_ms = rows_per_s / gpus / 1000.0
    # Dynamic batching closes a batch when it is full or when the oldest request waited max delay.
    batch_rows = min(policy.triton_max_batch_rows, rows_per_gpu_ms * policy.triton_max_queue_delay_ms)
    result.triton = {
        "rows_per_s": round(rows_per_s),
        "t4_rows_per_s": round(t4_rows_per_s),
        "t4_basis": t4_basis,
        "t4_gpus": gpus,
        "rows_per_batch_at_max_delay": round(batch_rows),
        "requests_per_batch_at_max_delay": round(batch_rows / load.candidates_per_request, 1),
        "max_queue_delay_ms": policy.triton_max_queue_delay_ms,
    }

    # Redis: every key kind the data plane holds (redis_data_bytes says which).
    by_kind, entity_bytes, embedding_basis = redis_data_bytes(load, measurements, policy, measured_bytes_per_entity)
    total_bytes = sum(by_kind.values())
    usable_per_shard = policy.redis_shard_memory_gb * GB * policy.redis_fill
    shards = max(3, _ceil(total_bytes / usable_per_shard))  # 3: the smallest Redis Cluster
    result.redis = {
        "data_gb": round(total_bytes / GB, 1),
        "data_gb_by_kind": {kind: round(b / GB, 2) for kind, b in by_kind.items()},
        "bytes_per_entity": round(entity_bytes),
        "basis": embedding_basis,
        "shards": shards,
        "nodes_with_replicas": shards * 2,
        "node_memory_gb": policy.redis_shard_memory_gb,
        "maxmemory_gb": round(policy.redis_shard_memory_gb * policy.redis_fill, 1),
    }

    # FAISS: the index size per copy, and how many copies the placement implies. In process (our
    # design) every orchestrator pod holds a copy, so the index must fit a pod: the flat-storage index
    # where it does, IVF-PQ codes where only they do, else dedicated replicas.
    flat_gb = load.items * m["faiss_bytes_per_item"] / GB
    pq_gb = load.items * m["faiss_bytes_per_item_pq"] / GB
    placement, index_kind, index_gb = policy.faiss_placement, "flat", flat_gb
    if placement == "in-process" and flat_gb > policy.faiss_in_process_max_gb:
        if pq_gb <= policy.faiss_in_process_max_gb:
            index_kind, index_gb = "pq", pq_gb
        else:
            placement = "dedicated"
    if placement == "in-process":
        replicas, replica_memory_gb = pods, index_gb
    else:
        per_replica_qps = m["faiss_search_qps_per_core"] * policy.faiss_cores_per_replica
        replicas = max(
            policy.min_replicas,
            _ceil(miss_qps / (per_replica_qps * policy.cpu_target_utilization)),
            _ceil(index_gb / policy.faiss_replica_memory_gb),
        )
        replica_memory_gb = policy.faiss_replica_memory_gb
    result.faiss = {
        "placement": placement,
        "index": "IVF-HNSW,PQ" if index_kind == "pq" else "IVF,Flat",  # flat codes; the build picks the quantizer
        "index_gb": round(index_gb, 1),
        "flat_index_gb": round(flat_gb, 1),
        "replicas": replicas,
        "replica_memory_gb": round(replica_memory_gb, 1),
        "search_qps": round(miss_qps),
    }

    # Latency: the measured full-path p99 plus the worst-case batching wait must fit the budget.
    miss_p99 = m["orchestrator_p99_ms_cache_miss"] + policy.triton_max_queue_delay_ms
    result.latency = {
        "p99_budget_ms": load.p99_ms,
        "cache_miss_p99_ms": round(miss_p99, 1),
        "headroom_ms": round(load.p99_ms - miss_p99, 1),
        "fits": miss_p99 <= load.p99_ms,
    }
    return result


def reference_case() -> tuple[Load, dict[str, Measurement], Policy]:
    """The per-unit figures the reference plan implies, so that :func:`plan` reproduces it.

    Reference: 100M users, 50K QPS, 90% cache hits, 50M items; 20 API servers x 8 CPU, 8 T4 with
    batch 64 and 5 ms wait, 16 Redis shards x 32 GB, 4 FAISS replicas x 64 GB.
    """
    load = Load(
        users=100_000_000,
        qps=50_000,
        p99_ms=100,
        cache_hit_rate=0.9,
        items=50_000_000,
        candidates_per_request=100,
        embedding_dim=256,
    )
    src = "implied by the reference plan"

    def ref(value: float, unit: str) -> Measurement:
        return Measurement(value, unit, src, provisional=False)

    measurements = {
        # 160 cores at 60% for 45K hits + 5K misses per second.
        "orchestrator_rps_per_core_cache_hit": ref(1000, "requests/s per core"),
        "orchestrator_rps_per_core_cache_miss": ref(100, "requests/s per core"),
        "orchestrator_p99_ms_cache_miss": ref(60, "ms"),
        # 5K misses/s x 100 candidates over 8 T4s at 70%; "batch 64" is the request batch (64 x 100 rows).
        "triton_cpu_rows_per_s": ref(9_000, "rows/s per CPU instance"),
        "t4_speedup_over_cpu_instance": ref(10, "x"),
        # 256-d fp32 embeddings (1 KiB) with Redis overhead; ~3.7 KB per user in all.
        "redis_bytes_per_embedding_128_fp32": ref(640, "bytes"),
        "redis_bytes_per_feature_row": ref(120, "bytes"),
        "redis_bytes_per_precomputed_list": ref(1_300, "bytes"),
        # The reference plan counts no seen sets.
        "redis_bytes_per_seen_set": ref(0, "bytes"),
        "redis_bytes_per_cache_entry": ref(1_600, "bytes"),
        # IVF,Flat over 256-d fp32: 1 KiB per item + ids and lists.
        "faiss_bytes_per_item": ref(1_100, "bytes"),
        "faiss_bytes_per_item_pq": ref(72, "bytes"),
        "faiss_search_qps_per_core": ref(300, "searches/s per core"),
    }
    policy = Policy(cores_per_pod=8, faiss_placement="dedicated", triton_max_batch_rows=64 * 100)
    return load, measurements, policy


def format_plan(p: Plan) -> str:
    o, t, r, f, lat = p.orchestrator, p.triton, p.redis, p.faiss, p.latency
    lines = [
        f"capacity plan: {p.load.users:,} users, {p.load.qps:,.0f} QPS, p99 {p.load.p99_ms:g} ms, "
        f"cache hit rate {p.load.cache_hit_rate:.0%}, {p.load.items:,} items",
        f"  orchestrator  {o['pods']} pods x {o['cores_per_pod']} CPU ({o['cores']} cores at "
        f"{p.policy.cpu_target_utilization:.0%}; = {o['servers']} servers x {o['cores_per_server']} CPU)",
        f"  triton        {t['t4_gpus']} T4 ({t['rows_per_s']:,} rows/s; "
        f"{t['t4_rows_per_s']:,} rows/s per T4, "
        f"{t['t4_basis']}); ~{t['rows_per_batch_at_max_delay']} rows "
        f"({t['requests_per_batch_at_max_delay']} requests) per batch at {t['max_queue_delay_ms']:g} ms",
        f"  redis         {r['shards']} shards x {r['node_memory_gb']:g} GB (+1 replica each = "
        f"{r['nodes_with_replicas']} nodes; {r['data_gb']} GB of data, maxmemory {r['maxmemory_gb']} GB; "
        f"{r['basis']})",
        "                "
        + ", ".join(f"{kind.replace('_', ' ')} {gb:g} GB" for kind, gb in r["data_gb_by_kind"].items()),
        f"  faiss         {f['replicas']} replicas ({f['placement']}, {f['index']}) "
        f"x {f['replica_memory_gb']} GB "
        f"(index {f['index_gb']} GB, flat {f['flat_index_gb']} GB; {f['search_qps']:,} searches/s)",
        f"  latency       cache-miss p99 {lat['cache_miss_p99_ms']} ms "
        f"vs budget {lat['p99_budget_ms']:g} ms: " + ("fits" if lat["fits"] else "DOES NOT FIT"),
    ]
    if p.provisional:
        lines.append(f"  provisional measurements (replace with `make bench`): {', '.join(p.provisional)}")
    return "\n".join(lines)
