"""``python -m export <command>``: the offline pipeline's one CLI.

The local stack (``up``, ``triton``) is ``python -m stack``; the benchmarks are ``python -m bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from export import cli_capacity, cli_dataplane, cli_release, cli_temporal, pipeline
from export.artifacts import BUILD_DIR, MODEL_REPOSITORY, artifacts_dir
from export.data import SyntheticSpec, generate_synthetic
from export.errors import DatasetSpecError, ExportError
from export.evaluate import MAX_EVAL_USERS
from export.interactions import check_name
from export.train import TrainConfig
from export.triton_config import BatchingSpec


def _synthetic_spec(args: argparse.Namespace) -> SyntheticSpec:
    defaults = SyntheticSpec()
    return SyntheticSpec(
        n_users=defaults.n_users if args.users is None else args.users,
        n_items=defaults.n_items if args.items is None else args.items,
        mean_interactions_per_user=(
            defaults.mean_interactions_per_user if args.interactions_per_user is None else args.interactions_per_user
        ),
        min_interactions_per_user=(
            defaults.min_interactions_per_user
            if args.min_interactions_per_user is None
            else args.min_interactions_per_user
        ),
        seed=defaults.seed if args.seed is None else args.seed,
    )


def _add_synthetic_options(parser: argparse.ArgumentParser, feature_tables: bool = False) -> None:
    defaults = SyntheticSpec()
    if feature_tables:  # `all`: with --interactions, --users and --items name feature tables
        parser.add_argument(
            "--users",
            metavar="N|PATH",
            help=f"synthetic users (default {defaults.n_users}); with --interactions: the user feature table "
            "(CSV/Parquet: user_id + up to 3 feature columns)",
        )
        parser.add_argument(
            "--items",
            metavar="N|PATH",
            help=f"synthetic items (default {defaults.n_items}); with --interactions: the item feature table "
            "(CSV/Parquet: item_id + up to 2 feature columns)",
        )
    else:
        parser.add_argument("--users", type=int, help=f"synthetic users (default {defaults.n_users})")
        parser.add_argument("--items", type=int, help=f"synthetic items (default {defaults.n_items})")
    parser.add_argument(
        "--interactions-per-user",
        type=int,
        help=f"mean synthetic interactions per user (default {defaults.mean_interactions_per_user})",
    )
    parser.add_argument(
        "--min-interactions-per-user",
        type=int,
        help=f"fewest synthetic interactions per user (default {defaults.min_interactions_per_user})",
    )
    parser.add_argument("--seed", type=int, help=f"synthetic data seed (default {defaults.seed})")


def _cmd_data(args: argparse.Namespace) -> int:
    spec = _synthetic_spec(args)
    folder = generate_synthetic(Path(args.out), spec)
    print(f"wrote a synthetic data set ({spec.n_users} users, {spec.n_items} items) to {folder}")
    return 0


def _count(value: str | int | None, option: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise DatasetSpecError(
            option, "an integer count of synthetic entities (a feature table only with --interactions)", repr(value)
        ) from None


def _cmd_own(args: argparse.Namespace, cfg: TrainConfig) -> int:
    if not args.name:
        raise DatasetSpecError("--interactions", "--name NAME too (build/artifacts/NAME)", "no --name")
    other = {
        "--dataset": args.dataset != "synthetic",
        "--data-dir": bool(args.data_dir),
        "--interactions-per-user": args.interactions_per_user is not None,
        "--min-interactions-per-user": args.min_interactions_per_user is not None,
        "--seed": args.seed is not None,
    }
    if any(other.values()):
        given = ", ".join(option for option, on in other.items() if on)
        raise DatasetSpecError("--interactions", "no built-in data set option with an own log", given)
    bundle = pipeline.run_own(
        Path(args.interactions),
        args.name,
        users=Path(args.users) if args.users else None,
        items=Path(args.items) if args.items else None,
        categorical=tuple(args.categorical),
        cfg=cfg,
        version=args.version,
        build_dir=Path(args.build_dir),
        repo=Path(args.repo),
        eval_max_users=args.eval_users or None,
    )
    print(pipeline.format_metrics(bundle.manifest["metrics"]))
    print(f"model version {bundle.model_version}; artifacts in {bundle.path}; Triton models in {args.repo}")
    print(f"serve it: make up DATASET={args.name}")
    return 0


def _cmd_all(args: argparse.Namespace) -> int:
    cfg = TrainConfig(embedding_dim=args.dim, retrieval_epochs=args.retrieval_epochs, ranker_epochs=args.ranker_epochs)
    if args.interactions:
        return _cmd_own(args, cfg)
    if args.name or args.categorical:
        raise DatasetSpecError("--name and --categorical", "--interactions PATH (an own data set)", "none")
    args.users, args.items = _count(args.users, "--users"), _count(args.items, "--items")
    synthetic_options = (args.users, args.items, args.interactions_per_user, args.min_interactions_per_user, args.seed)
    if args.dataset != "synthetic" and any(option is not None for option in synthetic_options):
        raise ValueError(
            "--users, --items, --interactions-per-user, --min-interactions-per-user and --seed "
            "describe the synthetic data set only"
        )
    # No synthetic option: whatever complete data set the data folder holds (generated with the defaults
    # if none); any option: the data set of exactly that spec (regenerated when the folder holds another).
    spec = _synthetic_spec(args) if any(option is not None for option in synthetic_options) else None
    bundle = pipeline.run_all(
        args.dataset,
        cfg,
        version=args.version,
        build_dir=Path(args.build_dir),
        repo=Path(args.repo),
        synthetic=spec,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        eval_max_users=args.eval_users or None,
    )
    print(pipeline.format_metrics(bundle.manifest["metrics"]))
    print(f"model version {bundle.model_version}; artifacts in {bundle.path}; Triton models in {args.repo}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from export.model_repository import render_profile_repository

    batching = BatchingSpec(max_queue_delay_microseconds=args.max_queue_delay_us)
    dest = render_profile_repository(args.profile, Path(args.out), batching=batching)
    print(f"rendered the {args.profile} profile into {dest}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    if args.dataset not in pipeline.DATASETS:
        check_name(args.dataset, "--dataset")
    metrics = json.loads((artifacts_dir(args.dataset, Path(args.build_dir)) / "metrics.json").read_text())
    print(pipeline.format_metrics(metrics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate the synthetic data set (MovieLens format)")
    data.add_argument(
        "--data-dir", "--out", dest="out", default=str(pipeline.synthetic_dir()), help="the data folder to write"
    )
    _add_synthetic_options(data)
    data.set_defaults(func=_cmd_data)

    everything = commands.add_parser("all", help="train, evaluate, export to Triton, build the FAISS index")
    everything.add_argument("--dataset", choices=pipeline.DATASETS, default="synthetic", help="a built-in data set")
    everything.add_argument("--dim", type=int, default=TrainConfig.embedding_dim)
    everything.add_argument("--retrieval-epochs", type=int, default=TrainConfig.retrieval_epochs)
    everything.add_argument("--ranker-epochs", type=int, default=TrainConfig.ranker_epochs)
    everything.add_argument(
        "--version",
        type=int,
        default=1,
        help="model version N: bundle in BUILD_DIR/artifacts/DATASET/vN, Triton version folder N (others kept)",
    )
    everything.add_argument("--build-dir", default=str(BUILD_DIR), help="artifacts go to BUILD_DIR/artifacts/DATASET")
    everything.add_argument(
        "--data-dir",
        help="the data folder (default: BUILD_DIR/data/synthetic, generated there if missing; "
        "movielens: $RECSERVE_MOVIELENS_DIR or ../shared/data/movielens-100k)",
    )
    everything.add_argument(
        "--repo", "--model-repository", dest="repo", default=str(MODEL_REPOSITORY), help="the Triton model repository"
    )
    everything.add_argument(
        "--eval-users",
        type=int,
        default=MAX_EVAL_USERS,
        help="evaluate a seeded sample of this many users past that many (0: every user)",
    )
    own = everything.add_argument_group(
        "own data",
        "an interaction log (docs/DATA.md) instead of a built-in data set; --users/--items: its feature tables",
    )
    own.add_argument(
        "--interactions", metavar="PATH", help="CSV or Parquet: user_id, item_id, timestamp[, weight, event_type]"
    )
    own.add_argument(
        "--name", help="the data set's name: artifacts in BUILD_DIR/artifacts/NAME, served by make up DATASET=NAME"
    )
    own.add_argument(
        "--categorical",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a feature column to treat as categorical although its values are numbers (repeatable)",
    )
    _add_synthetic_options(everything, feature_tables=True)
    everything.set_defaults(func=_cmd_all)

    render = commands.add_parser("render", help="render a Triton profile's repository (default: cpu)")
    render.add_argument("--profile", choices=("cpu", "gpu-t4"), default="cpu")
    render.add_argument("--out", default=str(BUILD_DIR / "triton" / "cpu"))
    render.add_argument("--max-queue-delay-us", type=int, default=BatchingSpec.max_queue_delay_microseconds)
    render.set_defaults(func=_cmd_render)

    metrics = commands.add_parser("metrics", help="print the offline evaluation of a bundle")
    metrics.add_argument("--dataset", default="synthetic", help="a built-in data set or an own one's NAME")
    metrics.add_argument("--build-dir", default=str(BUILD_DIR))
    metrics.set_defaults(func=_cmd_metrics)

    cli_capacity.add_commands(commands)
    cli_dataplane.add_commands(commands)
    cli_release.add_commands(commands)
    cli_temporal.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
