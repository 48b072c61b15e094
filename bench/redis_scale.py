"""Section ``redis``: every key kind of the data plane at 1M users x 1M items in one redis-server, measured
against the capacity plan's Redis estimate.

Two runs, each in its own throw-away redis-server (``stack.redis_local``: free port, temporary folder, no
persistence; the folder goes with the server):

1. sample: 20,000 users and items, each key kind written alone (FLUSHALL in between), so that its INFO
   used_memory delta per key is its own. These per-key figures go to docs/measurements.json, where the
   capacity plan (export/capacity.py) reads them.
2. full scale: 1,000,000 users and 1,000,000 items, every kind together (fp16 embeddings, feature rows, seen
   sets, pre-computed top-50 lists, and cached lists for the plan's share of users), written in pipelined
   chunks by ``export.plan.measure_key_kinds``; its used_memory is set against the plan's estimate for the
   same sizes, computed from the sample's figures.

``--quick`` runs the full-scale step at 100,000 users and items: a smoke test, not the figure to quote.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace

from bench.runner import BenchContext, Measured, SectionResult, format_ratio, markdown_table
from export import capacity
from export.plan import KEY_KINDS, FillSpec, ScaleMeasurement, human, measure_key_kinds
from stack.redis_local import start_server

log = logging.getLogger(__name__)

SAMPLE = 20_000
FULL = 1_000_000
QUICK_FULL = 100_000
DIM = 128
# A baseline plan for the comparison only: no seen sets and a guessed 600 B cache entry, with the per-key figures
# of docs/measurements.json of 2026-11-29 (python -m export bench, 10:35 UTC).
PLAN_BEFORE = {"embedding_fp16": 424.0, "feature_row": 88.0, "precomputed_list": 952.0, "cache_entry": 600.0}
TOLERANCE = 0.15  # the plan must land within 15% of the measured memory


def _measure(spec: FillSpec, kinds: tuple[str, ...], isolate: bool, progress: bool) -> ScaleMeasurement:
    server = start_server()
    try:
        return asyncio.run(measure_key_kinds(server.url, spec, progress=progress, kinds=kinds, isolate=isolate))
    finally:
        server.stop()


def per_unit_figures(sample: ScaleMeasurement, sample_fp32: ScaleMeasurement) -> dict[str, float]:
    """The capacity plan's Redis inputs from the sample runs (bytes per key, used_memory delta)."""
    k = sample.kinds
    return {
        "redis_bytes_per_embedding_128_fp16": (k["user_embedding"].bytes_per_key + k["item_embedding"].bytes_per_key)
        / 2,
        "redis_bytes_per_embedding_128_fp32": (
            sample_fp32.kinds["user_embedding"].bytes_per_key + sample_fp32.kinds["item_embedding"].bytes_per_key
        )
        / 2,
        "redis_bytes_per_feature_row": (k["user_features"].bytes_per_key + k["item_features"].bytes_per_key) / 2,
        "redis_bytes_per_seen_set": k["seen"].bytes_per_key,
        "redis_bytes_per_precomputed_list": k["precomputed"].bytes_per_key,
        "redis_bytes_per_cache_entry": k["cache_entry"].bytes_per_key,
    }


def plan_estimate(figures: dict[str, float], users: int, items: int, source: str) -> dict[str, float]:
    """The capacity plan's Redis bytes per kind for ``users`` x ``items`` (fp16), from ``figures``."""
    measurements = {key: capacity.Measurement(value, "bytes", source, False) for key, value in figures.items()}
    load = capacity.Load(users=users, qps=1, p99_ms=100, cache_hit_rate=0.5, items=items, embedding_dtype="fp16")
    by_kind, _, _ = capacity.redis_data_bytes(load, measurements, capacity.Policy())
    return by_kind


def plan_before(users: int, items: int, cache_user_fraction: float) -> float:
    """The baseline plan's Redis bytes: no seen sets, a 600 B cache entry."""
    b = PLAN_BEFORE
    return (
        (users + items) * (b["embedding_fp16"] + b["feature_row"])
        + users * b["precomputed_list"]
        + users * cache_user_fraction * b["cache_entry"]
    )


def _kind_rows(full: ScaleMeasurement, estimate: dict[str, float], before: dict[str, float]) -> list[list[object]]:
    """Measured bytes per plan kind at full scale beside the plan's estimate of it."""
    k = full.kinds
    groups = {
        "embeddings": ("user_embedding", "item_embedding"),
        "feature_rows": ("user_features", "item_features"),
        "seen_sets": ("seen",),
        "precomputed_lists": ("precomputed",),
        "cache_entries": ("cache_entry",),
    }
    rows: list[list[object]] = []
    for kind, members in groups.items():
        keys = sum(k[m].keys for m in members)
        measured = sum(k[m].used_memory_delta for m in members)
        rows.append(
            [
                kind.replace("_", " "),
                f"{keys:,}",
                human(measured),
                f"{measured / keys:,.0f}" if keys else "-",
                f"{sum(k[m].memory_usage_mean * k[m].keys for m in members) / max(1, keys):,.0f}",
                human(before.get(kind, 0.0)),
                human(estimate[kind]),
                format_ratio(estimate[kind] / measured) if measured else "-",
            ]
        )
    return rows


def run_section(ctx: BenchContext) -> SectionResult:
    full_n = QUICK_FULL if ctx.quick else FULL
    policy = capacity.Policy()
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    # The sample's ids span the full catalogue's, so that values have the full run's id widths.
    sample_spec = FillSpec(
        SAMPLE, SAMPLE, DIM, "fp16", cached_users=round(SAMPLE * policy.cache_user_fraction), id_space=full_n
    )
    log.info("redis: sample of %s users and items, every kind alone", f"{SAMPLE:,}")
    sample = _measure(sample_spec, KEY_KINDS, isolate=True, progress=False)
    sample_fp32 = _measure(
        replace(sample_spec, dtype="fp32"), ("user_embedding", "item_embedding"), isolate=True, progress=False
    )
    figures = per_unit_figures(sample, sample_fp32)
    estimate = plan_estimate(figures, full_n, full_n, ctx.source())
    full_spec = FillSpec(full_n, full_n, DIM, "fp16", cached_users=round(full_n * policy.cache_user_fraction))
    log.info("redis: %s users x %s items, every kind together", f"{full_n:,}", f"{full_n:,}")
    full = _measure(full_spec, KEY_KINDS, isolate=False, progress=True)
    seconds = time.perf_counter() - started
    load_end = os.getloadavg()[0]

    estimated = sum(estimate.values())
    before_total = plan_before(full_n, full_n, policy.cache_user_fraction)
    before_kinds = {
        "embeddings": 2 * full_n * PLAN_BEFORE["embedding_fp16"],
        "feature_rows": 2 * full_n * PLAN_BEFORE["feature_row"],
        "precomputed_lists": full_n * PLAN_BEFORE["precomputed_list"],
        "cache_entries": full_n * policy.cache_user_fraction * PLAN_BEFORE["cache_entry"],
    }
    error = estimated / full.data_bytes - 1
    error_before = before_total / full.data_bytes - 1
    within = abs(error) <= TOLERANCE
    fill_rate = sum(m.keys for m in full.kinds.values()) / sum(m.seconds for m in full.kinds.values())

    sample_rows = [
        [key.removeprefix("redis_bytes_per_").replace("_", " "), f"{value:,.0f}"] for key, value in figures.items()
    ]
    markdown = "\n".join(
        [
            "## Redis at 1M users x 1M items: every key kind against the capacity plan",
            "",
            ctx.provenance(),
            "",
            f"redis-server {full.redis_version}, one process, no persistence, started for the run on a free port "
            f"in a temporary folder and deleted after it. 1-minute load average {load_start:.2f} at the start, "
            f"{load_end:.2f} at the end (2 shared cores); the whole section took {seconds:.0f} s. Keys, values "
            "and codecs are the project's own (`export.plan.measure_key_kinds` writes through "
            "`RedisEmbeddingStore`, `RedisFeatureStore`, `RedisPrecomputedStore` and the cache's HSET + EXPIRE), "
            "contents synthetic at the real sizes: 128-d embeddings, 3-field feature rows, seen sets with the "
            f"synthetic generator's history lengths (lognormal around 100, at least 20; mean {full.mean_history:.1f} "
            "items), numeric ids as in MovieLens and the synthetic set (Redis keeps such sets as intsets), "
            "pre-computed top-50 lists with a 7-day TTL, and one cached top-100 list (one context, 300 s TTL) for "
            f"{policy.cache_user_fraction:.0%} of the users, the plan's `cache_user_fraction`.",
            "",
            f"### Per-key figures (sample: {SAMPLE:,} users and items, ids spread over 1..{full_n:,}, each kind alone)",
            "",
            "INFO used_memory delta per key (key, value, TTL and the key's share of Redis's tables); these are "
            "the capacity plan's Redis inputs (docs/measurements.json).",
            "",
            markdown_table(["figure", "bytes"], sample_rows),
            "",
            f"### Full scale: {full_n:,} users x {full_n:,} items in one redis-server",
            "",
            f"Written in pipelined chunks of {full_spec.chunk:,} keys ({fill_rate:,.0f} keys/s over all kinds); "
            f"{sum(m.keys for m in full.kinds.values()):,} keys. used_memory: {human(full.used_memory)} "
            f"({human(full.data_bytes)} over the empty server's {human(full.baseline_used_memory)}).",
            "",
            markdown_table(
                [
                    "kind",
                    "keys",
                    "measured (used_memory delta)",
                    "B/key",
                    "MEMORY USAGE B/key",
                    "baseline plan",
                    "plan",
                    "plan / measured",
                ],
                _kind_rows(full, estimate, before_kinds),
            ),
            "",
            "(A kind's used_memory delta includes the growth of Redis's key table it happened to trigger, so "
            "single rows can stray; the total does not.)",
            "",
            markdown_table(
                ["", "Redis data", "vs measured"],
                [
                    ["measured (used_memory - empty server)", human(full.data_bytes), "-"],
                    [
                        "baseline plan (no seen sets, cache entry 600 B, list 952 B)",
                        human(before_total),
                        f"{error_before:+.1%}",
                    ],
                    ["plan (every kind, the sample's figures)", human(estimated), f"{error:+.1%}"],
                ],
            ),
            "",
            f"**The plan's estimate is {error:+.1%} off the measured memory at {full_n:,} x {full_n:,}** "
            + (
                f"(within the {TOLERANCE:.0%} it must hit); the baseline plan's is {error_before:+.1%}."
                if within
                else f"(OUTSIDE the {TOLERANCE:.0%} it must hit); the baseline plan's is {error_before:+.1%}."
            )
            + " The figures extrapolate from a 20,000-key sample; the full-scale run checks them.",
        ]
    )
    units = {
        "redis_bytes_per_embedding_128_fp16": "bytes of Redis memory per stored 128-d float16 embedding, key and "
        "overhead included (INFO used_memory delta per key)",
        "redis_bytes_per_embedding_128_fp32": "bytes of Redis memory per stored 128-d float32 embedding, key and "
        "overhead included (INFO used_memory delta per key)",
        "redis_bytes_per_feature_row": "bytes per packed int32 feature row with its key (INFO used_memory delta per "
        "key, mean of user and item rows)",
        "redis_bytes_per_seen_set": f"bytes per user's seen set (numeric item ids, mean {sample.mean_history:.0f} "
        "items: the synthetic history lengths; INFO used_memory delta per key)",
        "redis_bytes_per_precomputed_list": "bytes per user's pre-computed top-50 (JSON items, scores, "
        "model_version, computed_at) with key and TTL (INFO used_memory delta per key)",
        "redis_bytes_per_cache_entry": "bytes per cached response (one context of a user's rc: hash: JSON "
        "top-100, scores, model version, generation) with key and TTL (INFO used_memory delta per key)",
    }
    measurements = {key: Measured(round(value, 1), units[key]) for key, value in figures.items()}
    if ctx.quick:
        measurements = {}  # a smoke test writes no figures
    return SectionResult(markdown, measurements)
