"""Measure pre-compute at any number of users: ``python -m bench.precompute``.

Training a model for 1M users takes far longer than the pre-compute it would feed, and pre-compute's cost
does not depend on what the weights learned: it is a FAISS search at the pre-compute depth, a ranker run
over ``n_candidates`` rows per user and a Redis write. So the bench builds a bundle of the production
shape in seconds (``synthetic_bundle``): clustered unit-norm user and item embeddings of ``dim`` 128, in-
vocabulary features, Zipf-popular histories, a randomly initialised ranker of the shipped architecture
exported to ONNX as ``python -m export all`` exports it, and the FAISS index ``build_index`` picks for that
many items (IVF-HNSW with nprobe tuned to recall@100 >= 0.95 from 50K items). Then it runs the job
(``precompute_processes``) against the Redis given with ``--redis`` and prints users/s, users/s per
process and per CPU-second, and what that implies for 100M users per pod count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np

from export.artifacts import Bundle, save_bundle
from export.dataplane import schema
from export.faiss_index import EXACT_THRESHOLD, build_index
from export.history import UserHistory


def _clustered(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> np.ndarray:
    out = np.empty((n, centers.shape[1]), dtype=np.float32)
    for lo in range(0, n, 100_000):  # chunks: no float64 temporaries of n x dim
        hi = min(n, lo + 100_000)
        x = centers[rng.integers(0, len(centers), hi - lo)] + spread * rng.standard_normal(
            (hi - lo, centers.shape[1]), dtype=np.float32
        )
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _features(rng: np.random.Generator, n: int, vocabulary: tuple[tuple[str, int], ...]) -> np.ndarray:
    return np.stack([rng.integers(0, size, n) for _, size in vocabulary], axis=1).astype(np.int64)


def synthetic_bundle(
    path: Path,
    n_users: int,
    n_items: int,
    dim: int = 128,
    mean_history: int = 30,
    min_history: int = 5,
    seed: int = 0,
    exact_threshold: int = EXACT_THRESHOLD,
) -> Bundle:
    """Write a complete bundle of the production shape to ``path`` (plus ``ranker.onnx``); see the module
    docstring. Histories: lengths geometric around ``mean_history`` (at least ``min_history``), items drawn
    by Zipf(1) popularity. ``exact_threshold``: below this many items the index is exact (``build_index``)."""
    import torch

    from export.model_export import export_onnx
    from export.models import Ranker

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, dim), dtype=np.float32)
    item_embeddings = _clustered(rng, centers, n_items, 0.8)
    user_embeddings = _clustered(rng, centers, n_users, 0.8)
    user_ids = [str(u) for u in range(1, n_users + 1)]
    item_ids = [f"i{i}" for i in range(1, n_items + 1)]
    lengths = np.maximum(min_history, rng.geometric(1.0 / max(1, mean_history - min_history), n_users) + min_history)
    lengths = np.minimum(lengths, n_items // 2)
    popularity = np.cumsum(1.0 / np.arange(1, n_items + 1))
    popularity /= popularity[-1]
    rank_to_row = rng.permutation(n_items)
    drawn = rank_to_row[np.searchsorted(popularity, rng.random(int(lengths.sum())))]
    history = UserHistory(user_ids, item_ids, np.concatenate([[0], np.cumsum(lengths)]), drawn.astype(np.int32))
    version = f"bench-{n_users}x{n_items}-s{seed}"
    bundle = Bundle(
        path,
        {"model_version": version, "embedding_dim": dim, "n_users": n_users, "n_items": n_items, "synthetic": True},
        user_ids,
        item_ids,
        user_embeddings,
        item_embeddings,
        _features(rng, n_users, schema.USER_FEATURES),
        _features(rng, n_items, schema.ITEM_FEATURES),
        history,
        {schema.GLOBAL_SEGMENT: item_ids[:100]},
    )
    torch.manual_seed(seed)
    export_onnx(Ranker(dim), path / "ranker.onnx")
    # The index build tunes nprobe on the first 1,000 query vectors: users, as the pipeline does.
    index = build_index(
        item_embeddings,
        item_ids,
        version,
        path / "item_index.faiss",
        queries=user_embeddings[:1000],
        exact_threshold=exact_threshold,
    )
    bundle.manifest["index"] = {"factory": index.index_factory, "nprobe": index.nprobe, "recall": index.recall_at_100}
    save_bundle(bundle)
    return bundle


def main(argv: list[str] | None = None) -> int:
    from export.precompute import RANKERS, PrecomputeConfig, precompute_processes

    parser = argparse.ArgumentParser(prog="python -m bench.precompute", description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--mean-history", type=int, default=30)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (built there unless it has one)")
    parser.add_argument("--redis", required=True, help="redis:// URL of a scratch server (never a shared one)")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--shard-count", type=int, default=1, help="measure one pod's shard of the users")
    parser.add_argument("--batch-users", type=int, default=PrecomputeConfig.batch_users)
    parser.add_argument("--rank-rows", type=int, default=PrecomputeConfig.rank_rows)
    parser.add_argument("--ranker", choices=RANKERS, default=PrecomputeConfig.ranker)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    path = args.bundle or Path("build") / "bench" / f"precompute-{args.users}x{args.items}"
    if not (path / "manifest.json").is_file():
        started = time.perf_counter()
        synthetic_bundle(path, args.users, args.items, mean_history=args.mean_history)
        print(f"built {path} in {time.perf_counter() - started:.1f} s")
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = PrecomputeConfig(
        batch_users=args.batch_users,
        rank_rows=args.rank_rows,
        shard_index=args.shard_index,
        shard_count=args.shard_count,
        ttl_s=3600,
        ranker=args.ranker,
    )
    load_before = os.getloadavg()
    report = asyncio.run(
        precompute_processes(
            [args.redis],
            path,
            path / "item_index.faiss",
            path / "ranker.onnx",
            cfg,
            args.processes,
            progress=not args.no_progress,
        )
    )
    load_after = os.getloadavg()
    done = report.users - report.skipped_users
    per_cpu_s = done / report.cpu_seconds if report.cpu_seconds else 0.0
    print(
        f"{done:,} users ({report.users:,} in shard {report.shard}, ranker {args.ranker}, model {report.version}, "
        "index "
        f"{manifest.get('index')}) in {report.seconds:.1f} s with {args.processes} processes: "
        f"{report.users_per_s:,.0f} users/s, {report.users_per_s / args.processes:,.0f} users/s per process, "
        f"{per_cpu_s:,.0f} users per CPU-second (setup {report.setup_seconds:.1f} s included); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    for pods in (8, 32, 128):
        hours = 100e6 / (per_cpu_s * 2 * pods) / 3600 if per_cpu_s else float("inf")
        print(f"100M users on {pods} pods of 2 cores at {per_cpu_s:,.0f} users/s per core: {hours:.2f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
