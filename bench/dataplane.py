"""Data-plane benchmarks (``python -m bench.dataplane``; part of ``make bench``).

Starts its own redis-server processes (never a system Redis) and measures: the Small row for real
(1M users + 100K items x 128 loaded, INFO memory vs the table; fp32 and fp16), the load rate, batch-read
latency for 200 ids (one pipeline/MGET per shard vs one GET at a time, on 3 shards and a 3-master
cluster), the pre-compute rate and what it means for 100M users, and what fp16 storage does to
ranking scores. Writes the "## Redis data plane" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from redis.asyncio import Redis

from export import dataplane
from export.artifacts import MODEL_REPOSITORY, REPO_ROOT, artifacts_dir, load_bundle
from export.dataplane import Backend
from export.plan import PlanInput, human, measure_bytes_per_entity, measure_small_values, plan
from export.precompute import Candidates, PrecomputeConfig, precompute, top_n
from stack.launch import cpu_count
from stack.redis_local import LocalCluster, RedisServer, start_cluster, start_server

log = logging.getLogger(__name__)
BENCHMARKS = REPO_ROOT / "docs" / "BENCHMARKS.md"
HEADING = "## Redis data plane"
CHUNK = 10_000


async def _used_memory(url: str) -> int:
    client = Redis.from_url(url)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


async def load_small_row(server: RedisServer, users: int, items: int, dim: int, dtype: str) -> dict[str, float]:
    """Load ``users`` + ``items`` random vectors through the store; rate and INFO memory."""
    backend = dataplane.sharded_backend([server.url], timeout_ms=30_000)
    store = dataplane.embedding_store(backend, "bench", dim, dtype)
    rng = np.random.default_rng(0)
    before = await _used_memory(server.url)
    elapsed = 0.0
    for kind, n in (("user", users), ("item", items)):
        for lo in range(0, n, CHUNK):
            rows = min(CHUNK, n - lo)
            ids = [str(i) for i in range(lo, lo + rows)]
            matrix = rng.normal(size=(rows, dim)).astype(np.float32)
            started = time.perf_counter()
            await store.set_batch(kind, ids, matrix)  # type: ignore[arg-type]
            elapsed += time.perf_counter() - started
    used = await _used_memory(server.url) - before
    await dataplane.drop_version(backend, "bench")
    await backend.aclose()
    entities = users + items
    return {"entities": entities, "seconds": elapsed, "per_s": entities / elapsed, "used_bytes": used}


def _percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


async def _timed(fn: Callable[[], Awaitable[Any]], reps: int) -> list[float]:
    await fn()  # warm the connections
    out = []
    for _ in range(reps):
        started = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def read_latency(
    backend: Backend, clients: list[Redis], route: Callable[[str], int], reps: int
) -> dict[str, float]:
    """200-id batch reads through the store vs one awaited GET per id (the naive loop)."""
    dim, n = 128, 100_000
    store = dataplane.embedding_store(backend, "bench", dim)
    rng = np.random.default_rng(1)
    for lo in range(0, n, CHUNK):
        await store.set_batch(
            "item", [str(i) for i in range(lo, lo + CHUNK)], rng.normal(size=(CHUNK, dim)).astype(np.float32)
        )
    batches = [[str(i) for i in rng.choice(n, 200, replace=False)] for _ in range(reps)]
    it = iter(batches * 2)

    async def batched() -> None:
        assert (await store.get_batch("item", next(it))).found.all()

    pipelined = await _timed(batched, reps - 1)
    one_by_one_batches = iter(batches[: max(20, reps // 10) + 1])

    async def one_at_a_time() -> None:
        for entity in next(one_by_one_batches):
            key = dataplane.embedding_key("bench", "item", entity)
            assert await clients[route(key)].get(key) is not None

    sequential = await _timed(one_at_a_time, max(20, reps // 10))
    p50, p99 = _percentiles(pipelined)
    s50, s99 = _percentiles(sequential)
    return {"p50_ms": p50, "p99_ms": p99, "seq_p50_ms": s50, "seq_p99_ms": s99, "ratio_p50": s50 / p50}


async def sharded_latency(servers: list[RedisServer], reps: int) -> dict[str, float]:
    backend = dataplane.sharded_backend([s.url for s in servers], timeout_ms=1000)
    clients = [Redis.from_url(s.url) for s in servers]
    try:
        ring = backend.ring
        return await read_latency(backend, clients, lambda k: int(ring.shard_indices([k])[0]), reps)
    finally:
        await backend.aclose()
        await asyncio.gather(*(c.aclose() for c in clients))


async def cluster_latency(cluster: LocalCluster, reps: int) -> dict[str, float]:
    backend = await dataplane.cluster_backend(cluster.url, timeout_ms=1000)
    try:
        client = backend.client
        return await read_latency(backend, [client], lambda _k: 0, reps)  # type: ignore[list-item]
    finally:
        await backend.aclose()


def precompute_and_fp16(server: RedisServer, bundle_dir: Path, model: Path) -> dict[str, float] | None:
    if not (bundle_dir / "manifest.json").is_file() or not model.is_file():
        return None
    bundle = load_bundle(bundle_dir)
    retriever = dataplane.faiss_retriever(bundle_dir / "item_index.faiss")
    ranker = dataplane.onnx_ranker(model, bundle.model_version, threads=cpu_count())

    async def run() -> float:
        backend = dataplane.sharded_backend([server.url], timeout_ms=30_000)
        try:
            report = await precompute(backend, bundle, retriever, ranker, PrecomputeConfig(), progress=False)
        finally:
            await backend.aclose()
        return report.users_per_s

    users_per_s = asyncio.run(run())

    # fp16 storage: rank each user's candidates from fp32 vectors and from fp16-rounded ones.
    candidates = Candidates(bundle, retriever, PrecomputeConfig())
    rows = list(range(min(500, len(bundle.user_ids))))
    lists = candidates.for_users(rows)
    diffs, same_lists, overlaps = [], 0, []
    for row, items in zip(rows, lists, strict=True):
        request = candidates.request(row, items)
        exact = ranker.run(request.tensors())
        halved = request.tensors()
        for name in ("user_embedding", "item_embedding"):
            halved[name] = halved[name].astype(np.float16).astype(np.float32)
        approx = ranker.run(halved)
        diffs.append(np.abs(exact - approx))
        a, _ = top_n(items, exact, 50)
        b, _ = top_n(items, approx, 50)
        same_lists += a == b
        overlaps.append(len(set(a) & set(b)) / 50)
    all_diffs = np.concatenate(diffs)
    return {
        "users": len(bundle.user_ids),
        "users_per_s": users_per_s,
        "fp16_max_abs_score_diff": float(all_diffs.max()),
        "fp16_mean_abs_score_diff": float(all_diffs.mean()),
        "fp16_identical_top50": same_lists / len(rows),
        "fp16_mean_overlap_at_50": float(np.mean(overlaps)),
        "fp16_users_compared": len(rows),
        "model_version": bundle.model_version,  # type: ignore[dict-item]
    }


def run(
    users: int = 1_000_000, items: int = 100_000, reps: int = 300, dataset: str = "synthetic", provenance: str = ""
) -> tuple[dict[str, Any], list[str]]:
    results: dict[str, Any] = {"cores": cpu_count(), "loadavg": os.getloadavg()[0]}
    server = start_server()
    try:
        for dtype in ("fp32", "fp16"):
            log.info("loading the Small row (%s)", dtype)
            results[f"small_{dtype}"] = asyncio.run(load_small_row(server, users, items, 128, dtype))
            results[f"measured_{dtype}"] = asyncio.run(measure_bytes_per_entity(server.url, 128, dtype))
        log.info("pre-compute and fp16 score effect")
        bundle_dir = artifacts_dir(dataset)
        results["precompute"] = precompute_and_fp16(
            server, bundle_dir, MODEL_REPOSITORY / "ranker_onnx" / "1" / "model.onnx"
        )
        bundle = load_bundle(bundle_dir)
        users_with_recs = bundle.user_ids if results["precompute"] else []
        results["small_values"] = asyncio.run(
            measure_small_values(server.url, users_with_recs, version="bench", recs_version=bundle.model_version)
        )
    finally:
        server.stop()
    shards = [start_server() for _ in range(3)]
    try:
        results["sharded_read"] = asyncio.run(sharded_latency(shards, reps))
    finally:
        for s in shards:
            s.stop()
    cluster = start_cluster(3)
    try:
        results["cluster_read"] = asyncio.run(cluster_latency(cluster, reps))
    finally:
        cluster.stop()
    return results, markdown(results, users, items, provenance)


def markdown(r: dict[str, Any], users: int, items: int, provenance: str = "") -> list[str]:
    raw = plan(PlanInput(users, items, 128))
    raw_bytes = (users + items) * 128 * 4
    f32, f16 = r["small_fp32"], r["small_fp16"]
    m32, m16 = r["measured_fp32"], r["measured_fp16"]
    sr, cr = r["sharded_read"], r["cluster_read"]
    lines = [
        HEADING,
        "",
        provenance or f"Command: `python -m bench.dataplane` · date: {time.strftime('%Y-%m-%d')} · cores: {r['cores']}",
        "",
        f"Load average at the start: {r['loadavg']:.2f} on {r['cores']} cores (the machine is shared). "
        "redis-server 7.0, one process per shard, no persistence; every server is started by the benchmark.",
        "",
        "### The Small row for real",
        "",
        f"{users:,} users + {items:,} items x 128 loaded through `RedisEmbeddingStore.set_batch` "
        f"({CHUNK:,} rows per call, one MSET per shard) into one local redis-server.",
        "",
        "| dtype | raw (table) | INFO used_memory | bytes/embedding | MEMORY USAGE/key | load rate |",
        "|---|---:|---:|---:|---:|---:|",
        f"| fp32 | {raw['raw']} | {human(f32['used_bytes'])} | {f32['used_bytes'] / f32['entities']:.0f} "
        f"| {m32['memory_usage_per_key']:.0f} | {f32['per_s']:,.0f} embeddings/s |",
        f"| fp16 | {human(raw_bytes / 2)} | {human(f16['used_bytes'])} | {f16['used_bytes'] / f16['entities']:.0f} "
        f"| {m16['memory_usage_per_key']:.0f} | {f16['per_s']:,.0f} embeddings/s |",
        "",
        f"Real memory is {f32['used_bytes'] / raw_bytes:.2f}x the raw arithmetic for fp32: each 512-byte "
        "vector becomes a 516-byte value (4-byte header) in a 640-byte jemalloc class, plus the key "
        "(~25 bytes), its robj and the dict entry. fp16 saves "
        f"{1 - f16['used_bytes'] / f32['used_bytes']:.0%} of real memory, not 50%: the per-key overhead stays.",
        "",
        f"A 3-field user feature row is {r['small_values']['feature_row_packed']:.0f} bytes packed (int32) and "
        f"{r['small_values']['feature_row_hash']:.0f} bytes as a hash (MEMORY USAGE): rows are stored packed.",
        "",
        "### Batch read of 200 ids",
        "",
        "Random 200-id batches over 100K stored items x 128 fp32; the naive loop awaits one GET per id.",
        "",
        "| topology | store p50 | store p99 | one GET at a time p50 | p99 | speed-up (p50) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| 3 standalone shards (ring, one MGET per shard) | {sr['p50_ms']:.2f} ms | {sr['p99_ms']:.2f} ms "
        f"| {sr['seq_p50_ms']:.1f} ms | {sr['seq_p99_ms']:.1f} ms | {sr['ratio_p50']:.0f}x |",
        f"| 3-master Redis Cluster (one pipeline per node) | {cr['p50_ms']:.2f} ms | {cr['p99_ms']:.2f} ms "
        f"| {cr['seq_p50_ms']:.1f} ms | {cr['seq_p99_ms']:.1f} ms | {cr['ratio_p50']:.0f}x |",
        "",
    ]
    pc = r.get("precompute")
    if pc is None:
        lines += ["### Pre-compute", "", "Skipped: no trained bundle (run `make export` first).", ""]
        return lines
    lines += [
        "### Pre-compute",
        "",
        f"Model {pc['model_version']} ({pc['users']:,} users): FAISS batch search (200 candidates after "
        "removing seen items) + one ONNX Runtime call per 256 users + pipelined writes with TTL.",
        "",
        f"- rate: **{pc['users_per_s']:,.0f} users/s** on {r['cores']} cores "
        f"({pc['users_per_s'] / r['cores']:,.0f} users/s per core).",
    ]
    for pods in (8, 32, 128):
        hours = 100e6 / (pc["users_per_s"] * pods) / 3600
        lines.append(f"- 100M users on {pods} pods of {r['cores']} cores each: {hours:.1f} h")
    lines += [
        "",
        "The rate scales with ranker throughput (200 candidates x 100M users = 20 billion scores); with "
        "Triton on a T4 doing the ranking, pods become I/O-bound and the Indexed Job finishes well inside "
        "the 7-day TTL either way.",
        "",
        f"A stored top-50 list (JSON items + scores + model_version + computed_at, with TTL) takes "
        f"{r['small_values']['precomputed_list']:.0f} bytes (MEMORY USAGE, mean of 200 users).",
        "",
        "### fp16 storage and ranking scores",
        "",
        f"Over {pc['fp16_users_compared']} users x 200 candidates, ranking from fp16-rounded embeddings instead of "
        f"fp32: max |score diff| {pc['fp16_max_abs_score_diff']:.2e}, mean {pc['fp16_mean_abs_score_diff']:.2e}; "
        f"identical top-50 lists for {pc['fp16_identical_top50']:.0%} of users; mean overlap@50 "
        f"{pc['fp16_mean_overlap_at_50']:.3f}.",
        "",
    ]
    return lines


class BenchContextLike(Protocol):
    """The part of ``bench.runner.BenchContext`` this section uses."""

    quick: bool

    def provenance(self) -> str: ...


@dataclass
class DataplaneSection:
    """What ``make bench``'s runner takes from a section: markdown and figures for measurements.json."""

    markdown: str
    measurements: dict[str, dict[str, Any]]


def run_section(ctx: BenchContextLike) -> DataplaneSection:
    users, reps = (100_000, 100) if ctx.quick else (1_000_000, 300)
    results, lines = run(users=users, items=users // 10, reps=reps, provenance=ctx.provenance())
    figures: dict[str, dict[str, Any]] = {
        "redis_bytes_per_embedding_128_fp32": {
            "value": results["measured_fp32"]["memory_usage_per_key"],
            "unit": "bytes of Redis memory per stored 128-d float32 embedding, key and overhead included "
            "(MEMORY USAGE; INFO used_memory / count agrees within 1%)",
        },
        "redis_bytes_per_embedding_128_fp16": {
            "value": results["measured_fp16"]["memory_usage_per_key"],
            "unit": "bytes of Redis memory per stored 128-d float16 embedding, key and overhead included",
        },
    }
    figures["redis_bytes_per_feature_row"] = {
        "value": results["small_values"]["feature_row_packed"],
        "unit": "bytes per feature row (3 x int32 packed + key + overhead, MEMORY USAGE)",
    }
    if results.get("precompute"):
        figures["redis_bytes_per_precomputed_list"] = {
            "value": round(results["small_values"]["precomputed_list"]),
            "unit": "bytes per user's pre-computed top-50 (JSON items, scores, model_version, computed_at) with key "
            "and TTL (MEMORY USAGE)",
        }
        # Not precompute_users_per_s_per_core: that input of docs/CAPACITY.md is the 1M-user run of
        # bench.precompute, and this is the small data-plane model's wall-clock rate.
        figures["dataplane_precompute_users_per_s_per_core"] = {
            "value": round(results["precompute"]["users_per_s"] / results["cores"], 1),
            "unit": "users/s per core, wall clock: FAISS search + ranking of 200 candidates + Redis write, "
            "the data-plane section's small model",
        }
    return DataplaneSection("\n".join(lines), figures)


def write_section(lines: list[str], path: Path = BENCHMARKS) -> None:
    """Replace our marked block of docs/BENCHMARKS.md (the markers ``make bench`` uses), or append it."""
    begin, end = "<!-- section:dataplane -->", "<!-- /section:dataplane -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n" + "\n".join(lines).strip() + f"\n{end}"
    start, stop = text.find(begin), text.find(end)
    text = (
        text[:start] + block + text[stop + len(end) :] if 0 <= start < stop else text.rstrip() + "\n\n" + block + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Standalone: ``python -m bench.dataplane [USERS]`` (``make bench`` calls ``run_section``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = argv if argv is not None else sys.argv[1:]
    users = int(args[0]) if args else 1_000_000
    results, lines = run(users=users, items=users // 10)
    log.info("%s", results)
    write_section(lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
