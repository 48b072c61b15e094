"""``python -m export capacity``: the capacity plan (export/capacity.py) from the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from export import capacity


def _cmd_capacity(args: argparse.Namespace) -> int:
    if args.reference:
        load, measurements, policy = capacity.reference_case()
        measured_entity = None
    else:
        load = capacity.Load(
            users=args.users,
            qps=args.qps,
            p99_ms=args.p99_ms,
            cache_hit_rate=args.cache_hit_rate,
            items=args.items,
            candidates_per_request=args.candidates,
            embedding_dim=args.dim,
            embedding_dtype=args.dtype,
        )
        measurements = capacity.load_measurements(Path(args.measurements))
        policy = capacity.Policy(cores_per_pod=args.cores_per_pod)
        measured_entity = capacity.planner_bytes_per_entity(Path(args.plan_measured))
    result = capacity.plan(load, measurements, policy, measured_bytes_per_entity=measured_entity)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(capacity.format_plan(result))
    # A plan whose measured latency breaks the budget is still printed, but scripts must notice.
    return 0 if result.latency["fits"] else 1


def add_commands(subparsers: Any) -> None:
    """Add the ``capacity`` subcommand to ``python -m export``'s subparsers."""
    cmd = subparsers.add_parser(
        "capacity", help="capacity plan: orchestrator pods, T4 GPUs, Redis shards, FAISS replicas"
    )
    cmd.add_argument("--users", type=int, default=100_000_000)
    cmd.add_argument("--qps", type=float, default=50_000)
    cmd.add_argument("--p99-ms", type=float, default=100)
    cmd.add_argument("--cache-hit-rate", type=float, default=0.9)
    cmd.add_argument("--items", type=int, default=capacity.Load.items)
    cmd.add_argument(
        "--candidates",
        type=int,
        default=capacity.Load.candidates_per_request,
        help="candidate rows the ranker scores per cache-missing request",
    )
    cmd.add_argument("--dim", type=int, default=capacity.Load.embedding_dim, help="embedding dimension")
    cmd.add_argument(
        "--dtype",
        choices=sorted(capacity.EMBEDDING_BYTES),
        default=capacity.Load.embedding_dtype,
        help="embeddings as stored in Redis (`python -m export load --dtype`)",
    )
    cmd.add_argument("--cores-per-pod", type=int, default=capacity.Policy.cores_per_pod)
    cmd.add_argument("--measurements", default=str(capacity.MEASUREMENTS_PATH))
    cmd.add_argument(
        "--plan-measured",
        default=str(capacity.PLAN_MEASURED_PATH),
        help="the memory planner's `plan --json` output, used when the file exists",
    )
    cmd.add_argument(
        "--reference",
        action="store_true",
        help="plan with the figures the reference plan implies (reproduces it)",
    )
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    cmd.set_defaults(func=_cmd_capacity)
