"""``python -m export evaluate-temporal``: train on the past, evaluate popularity, the static two-tower +
ranker and the session-aware query on what each user did next (export/temporal_eval.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from export import pipeline, temporal_eval
from export.artifacts import BUILD_DIR, write_json
from export.evaluate import MAX_EVAL_USERS
from export.interactions import check_name, read_interactions
from export.train import TrainConfig


def _alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def _cmd_evaluate_temporal(args: argparse.Namespace) -> int:
    cfg = TrainConfig(embedding_dim=args.dim, retrieval_epochs=args.retrieval_epochs, ranker_epochs=args.ranker_epochs)
    serving = temporal_eval.SessionSpec(
        "serving", max_events=args.session_events, window_s=args.window_s, half_life_s=args.half_life_s
    )
    sessions = (serving, temporal_eval.SessionSpec("last-k", args.session_events, math.inf, math.inf))
    if args.interactions:  # an own log (docs/DATA.md), its event types weighing the session as in serving
        name = check_name(args.name)
        data = read_interactions(Path(args.interactions), name).dataset
    else:
        name = args.dataset
        data = pipeline.prepare_dataset(
            args.dataset, Path(args.build_dir), None, Path(args.data_dir) if args.data_dir else None
        )
    splits = temporal_eval.SPLITS if args.split == "both" else (args.split,)
    for split in splits:
        report = temporal_eval.run(data, split, cfg, args.alphas, sessions, args.test_fraction, args.eval_users or None)
        path = temporal_eval.report_path(Path(args.build_dir), name, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
        print(temporal_eval.format_report(report))
        print(f"(all rows in {path})\n")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add the ``evaluate-temporal`` subcommand to ``python -m export``'s subparsers."""
    cmd = subparsers.add_parser(
        "evaluate-temporal",
        help="train on the past; NDCG@10 / recall@50 of popularity, two-tower + ranker and the session-aware query",
    )
    cmd.add_argument("--dataset", default="movielens", help=f"one of {list(pipeline.DATASETS)} (default movielens)")
    cmd.add_argument("--data-dir", help="the data folder (default: where the data set's adapter looks)")
    cmd.add_argument(
        "--interactions",
        metavar="PATH",
        help="an own interaction log (CSV or Parquet, docs/DATA.md) instead of --dataset; features are not read",
    )
    cmd.add_argument("--name", default="own", help="with --interactions: the name its reports carry (default own)")
    cmd.add_argument("--build-dir", default=str(BUILD_DIR), help="reports go to BUILD_DIR/eval/")
    cmd.add_argument(
        "--split",
        choices=(*temporal_eval.SPLITS, "both"),
        default="both",
        help="global: one time cutoff for everyone (no leak); per-user: each user's latest share (default both)",
    )
    cmd.add_argument(
        "--test-fraction",
        type=float,
        default=temporal_eval.DEFAULT_TEST_FRACTION,
        help="share of interactions at or after the cutoff (global) or of each user's latest (per-user)",
    )
    cmd.add_argument(
        "--alphas",
        type=_alphas,
        default=temporal_eval.DEFAULT_ALPHAS,
        help="session blend weights to sweep, comma-separated (default 0.25,0.5,0.75,1)",
    )
    serving = temporal_eval.SERVING_SESSION
    cmd.add_argument(
        "--session-events", type=int, default=serving.max_events, help="K: the latest K events (serving default)"
    )
    cmd.add_argument("--window-s", type=float, default=serving.window_s, help="session window (serving default)")
    cmd.add_argument("--half-life-s", type=float, default=serving.half_life_s, help="event half-life (serving default)")
    cmd.add_argument("--dim", type=int, default=TrainConfig.embedding_dim)
    cmd.add_argument("--retrieval-epochs", type=int, default=TrainConfig.retrieval_epochs)
    cmd.add_argument("--ranker-epochs", type=int, default=TrainConfig.ranker_epochs)
    cmd.add_argument(
        "--eval-users",
        type=int,
        default=MAX_EVAL_USERS,
        help="evaluate a seeded sample of this many users past that many (0: every user)",
    )
    cmd.set_defaults(func=_cmd_evaluate_temporal)
