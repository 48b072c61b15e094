"""The data-plane commands of ``python -m export``: ``load``, ``precompute``, ``plan``.

``export/__main__.py`` calls ``add_commands(subparsers)``; each command's ``func`` takes the parsed
namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from export import dataplane
from export.artifacts import artifacts_dir, load_bundle
from export.dataplane import Backend, StoreError, default_onnx_model
from export.errors import ExportError

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
# `precompute --version active`: the version Redis's pointer names, read at the start (the CronJob's refresh).
ACTIVE = "active"
T = TypeVar("T")


class DataPlaneError(ExportError):
    """A data-plane failure, surfaced through the CLI's one error handler."""


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except StoreError as exc:
        raise DataPlaneError(str(exc)) from exc


def _add_redis_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        default=os.environ.get("RECSERVE_REDIS_URLS", DEFAULT_REDIS),
        help="comma-separated redis:// URLs (one per shard), or one node of a cluster with --cluster "
        "(default: $RECSERVE_REDIS_URLS or %(default)s)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        default=os.environ.get("RECSERVE_REDIS_MODE") == "cluster",
        help="--redis names a Redis Cluster node (default: true when $RECSERVE_REDIS_MODE is cluster)",
    )
    parser.add_argument("--timeout-ms", type=float, default=5000.0, help="per-shard deadline of each batch")


def _version_or_active(text: str) -> int | str:
    if text == ACTIVE:
        return ACTIVE
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a model version number N or {ACTIVE!r}, got {text!r}")
    return int(text)


def _add_bundle_args(parser: argparse.ArgumentParser, active: bool = False) -> None:
    """``active``: ``--version active`` names the version Redis's pointer names."""
    parser.add_argument("--dataset", default="synthetic", help="bundle under build/artifacts/<dataset>/v<version>")
    if active:
        parser.add_argument(
            "--version",
            type=_version_or_active,
            default=1,
            help=f"model version N: the bundle in v<N> (default 1); {ACTIVE!r}: the active version's, read from Redis",
        )
    else:
        parser.add_argument("--version", type=int, default=1, help="model version N: the bundle in v<N> (default 1)")
    parser.add_argument("--bundle", type=Path, default=None, help="artifact bundle folder (overrides --dataset)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


async def open_backend(args: argparse.Namespace) -> Backend:
    urls = [u.strip() for u in args.redis.split(",") if u.strip()]
    if args.cluster and len(urls) != 1:
        raise ValueError(f"--cluster takes one seed URL, got {len(urls)}")
    return await dataplane.open_backend(urls, cluster=args.cluster, timeout_ms=args.timeout_ms)


def _bundle_path(args: argparse.Namespace) -> Path:
    return args.bundle if args.bundle is not None else artifacts_dir(args.dataset, version=args.version)


def _cmd_load(args: argparse.Namespace) -> int:
    from export.load import LoadConfig, load

    bundle = load_bundle(_bundle_path(args))
    cfg = LoadConfig(
        dtype=args.dtype,
        chunk_rows=args.chunk_rows,
        activate=not args.no_activate,
        drop_previous=args.drop_previous,
        progress=not args.no_progress,
    )

    async def run() -> None:
        backend = await open_backend(args)
        try:
            report = await load(backend, bundle, cfg)
        finally:
            await backend.aclose()
        print(
            f"loaded {report.version} ({cfg.dtype}) in {report.seconds:.1f} s: {report.rows} "
            f"(resumed past {report.skipped_rows}); {report.embeddings_per_s:,.0f} embeddings/s; "
            f"replaced {report.previous} (dropped {report.dropped_keys} keys)"
        )

    _run(run())
    return 0


async def active_bundle_number(backend: Backend) -> int:
    """The bundle number (``v<N>``) of the version Redis's pointer names, from the metadata its load wrote."""
    from orchestrator.store import versions

    info = await versions.active(backend)
    if info.triton_version is None:
        raise DataPlaneError(
            f"expected the active version {info.version!r} to record its bundle number (v<N>), but its metadata "
            "has none (loaded from a bundle without triton_version): pass --version N"
        )
    return info.triton_version


async def _active_bundle_number(args: argparse.Namespace) -> int:
    backend = await open_backend(args)
    try:
        return await active_bundle_number(backend)
    finally:
        await backend.aclose()


def _cmd_precompute(args: argparse.Namespace) -> int:
    from export.precompute import BackendSpec, PrecomputeConfig, available_cores, precompute_processes

    if args.version == ACTIVE and args.bundle is None:
        args.version = _run(_active_bundle_number(args))
    path = _bundle_path(args)
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else None
    if manifest is None:
        load_bundle(path)  # raises the bundle's own "missing manifest.json" error
    # Kubernetes Indexed Jobs hand each pod its index in JOB_COMPLETION_INDEX.
    shard_index = args.shard_index if args.shard_index is not None else int(os.environ.get("JOB_COMPLETION_INDEX", 0))
    cfg = PrecomputeConfig(
        top_n=args.top_n,
        n_candidates=args.candidates,
        batch_users=args.batch_users,
        rank_rows=args.rank_rows,
        ttl_s=args.ttl_s,
        shard_index=shard_index,
        shard_count=args.shard_count,
        ranker=args.ranker,
    )
    cfg.validate()
    processes = args.processes or available_cores()
    urls = tuple(u.strip() for u in args.redis.split(",") if u.strip())
    if args.cluster and len(urls) != 1:
        raise ValueError(f"--cluster takes one seed URL, got {len(urls)}")
    report = _run(
        precompute_processes(
            BackendSpec(urls, args.cluster, args.timeout_ms),
            path,
            args.index or path / "item_index.faiss",
            args.model or default_onnx_model(manifest or {}),
            cfg,
            processes,
            progress=not args.no_progress,
        )
    )
    done = report.users - report.skipped_users
    print(
        f"shard {report.shard}: {report.users} users ({report.skipped_users} already done) in "
        f"{report.seconds:.1f} s with {processes} processes, {report.users_per_s:,.0f} users/s "
        f"({done / report.cpu_seconds if report.cpu_seconds else 0:,.0f} per CPU-second), model {report.version}, "
        f"ranker {cfg.ranker}"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from export.plan import PlanInput, markdown_table, measure, plan, reference_rows

    spec = PlanInput(args.users, args.items, args.dim, args.dtype, args.shard_memory_gb, args.max_fill)
    spec.validate()
    if args.measure and not args.redis:
        raise DataPlaneError(
            "plan --measure needs a Redis to measure in, but --redis was not given: pass --redis URL (a scratch "
            "server: the sample is written, measured and deleted), or run `python -m stack plan ... --measure`, "
            "which starts a throw-away redis-server"
        )
    measured = measure(args.redis, args.dim, args.dtype, args.sample) if args.measure else None
    result = plan(spec, measured["memory_usage_per_key"] if measured else None)
    if measured:
        result["measurement"] = measured
    if args.reference:
        per_dim = (
            {d: measure(args.redis, d, "fp32", args.sample)["memory_usage_per_key"] for d in (128, 256)}
            if args.measure
            else None
        )
        result["reference"] = reference_rows(args.shard_memory_gb, args.max_fill, per_dim)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for key, value in result.items():
        if key != "reference":
            print(f"{key:>28}: {value}")
    if args.reference:
        print("\n".join(markdown_table(result["reference"])))  # type: ignore[arg-type]
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    load = subparsers.add_parser("load", help="load a bundle's embeddings, features, history into Redis")
    _add_bundle_args(load)
    _add_redis_args(load)
    load.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="embedding storage dtype")
    load.add_argument("--chunk-rows", type=int, default=5000, help="rows per pipelined write and checkpoint")
    load.add_argument("--no-activate", action="store_true", help="load beside the active version, do not switch")
    load.add_argument(
        "--drop-previous",
        action="store_true",
        help="delete the version switched away from (default: keep it for a rollback; `retire` drops it later)",
    )
    load.set_defaults(func=_cmd_load)

    pre = subparsers.add_parser("precompute", help="top-N for every user (or one shard of them) into Redis")
    _add_bundle_args(pre, active=True)
    _add_redis_args(pre)
    pre.add_argument("--model", type=Path, default=None, help="ranker ONNX (default: model_repository)")
    pre.add_argument("--index", type=Path, default=None, help="FAISS index (default: the bundle's)")
    pre.add_argument("--top-n", type=int, default=50)
    pre.add_argument("--candidates", type=int, default=200, help="ranked candidates per user")
    pre.add_argument("--batch-users", type=int, default=1024, help="users per FAISS search, write and checkpoint")
    pre.add_argument(
        "--ranker",
        choices=("factored", "bf16", "onnx"),  # export.precompute.RANKERS, which loads FAISS: not imported here
        default="factored",
        help="factored (default): the model's weights regrouped, fp32, scores to ~1e-7; bf16: the same with its big "
        "product in bf16, ~1.2x the users/s on a CPU with native bf16, scores to ~5e-4; onnx: the exported model",
    )
    pre.add_argument("--rank-rows", type=int, default=1024, help="rows per ONNX Runtime call (--ranker onnx)")
    pre.add_argument("--ttl-s", type=int, default=7 * 86400)
    pre.add_argument("--shard-index", type=int, default=None, help="default: $JOB_COMPLETION_INDEX or 0")
    pre.add_argument("--shard-count", type=int, default=1)
    pre.add_argument(
        "--processes",
        type=int,
        default=0,
        help="worker processes, one ranker thread each (default 0: one per core this pod may use, "
        "its CPU affinity capped by the cgroup CPU limit)",
    )
    pre.set_defaults(func=_cmd_precompute)

    plan = subparsers.add_parser("plan", help="memory and shards for N users x M items x D dims")
    plan.add_argument("--users", type=int, required=True)
    plan.add_argument("--items", type=int, required=True)
    plan.add_argument("--dim", type=int, required=True)
    plan.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    plan.add_argument("--shard-memory-gb", type=float, default=8.0, help="memory per shard (decimal GB)")
    plan.add_argument("--max-fill", type=float, default=0.6, help="fraction of a shard the data may use")
    plan.add_argument("--measure", action="store_true", help="measure bytes per embedding in a real Redis")
    plan.add_argument(
        "--redis", default=None, help="Redis to measure in (`python -m stack plan` starts a throw-away one)"
    )
    plan.add_argument("--sample", type=int, default=20_000, help="embeddings loaded to measure")
    plan.add_argument("--reference", action="store_true", help="also print the reference table recomputed")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=_cmd_plan)
