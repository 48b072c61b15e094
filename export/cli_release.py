"""The release commands of ``python -m export``: ``publish``, ``rollback``, ``retire`` (export/release.py).

Each finds the stack through ``build/stack.env`` (``--stack-env`` points elsewhere) unless ``--redis`` is
given (or ``$RECSERVE_REDIS_URLS`` set, as in the Kubernetes Jobs: a URL with a password stays off the
command line), in which case ``--triton-http`` and ``--served-repository`` say where Triton is (both
optional).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from export import dataplane, release
from export.artifacts import BUILD_DIR, MODEL_REPOSITORY, artifacts_dir, load_bundle
from export.dataplane import Backend, StoreError
from export.release import ReleaseError, Target

T = TypeVar("T")


def target_of(args: argparse.Namespace) -> Target:
    if args.redis:
        urls = [u.strip() for u in args.redis.split(",") if u.strip()]
        return Target(
            urls,
            cluster=args.cluster,
            triton_http_url=args.triton_http,
            served_repositories=[Path(p) for p in args.served_repository],
        )
    path = Path(args.stack_env)
    if not path.is_file():
        raise ReleaseError(f"no stack at {path}: start one (`make up`) or say where Redis is with --redis URL[,URL...]")
    target = Target.from_stack_env(release.read_env_file(path))
    if args.triton_http:
        target.triton_http_url = args.triton_http
    target.served_repositories += [Path(p) for p in args.served_repository]
    return target


def run_on(target: Target, work: Callable[[Backend], Awaitable[T]]) -> T:
    async def run() -> T:
        backend = await dataplane.open_backend(target.redis_urls, cluster=target.cluster, timeout_ms=target.timeout_ms)
        try:
            return await work(backend)
        finally:
            await backend.aclose()

    try:
        return asyncio.run(run())
    except StoreError as exc:
        raise ReleaseError(str(exc)) from exc


def _bundle_dir(args: argparse.Namespace) -> Path:
    return artifacts_dir(args.dataset, Path(args.build_dir), args.version)


def _cmd_publish(args: argparse.Namespace) -> int:
    bundle = load_bundle(_bundle_dir(args))
    target = target_of(args)
    report = run_on(
        target,
        lambda backend: release.publish(
            backend,
            bundle,
            target,
            Path(args.repo),
            dtype=args.dtype,
            threads=args.threads,
            progress=not args.no_progress,
            served_timeout_s=args.served_timeout_s,
            canary_percent=args.canary,
        ),
    )
    if report.canary_percent is not None:
        print(
            f"published {report.version} as a canary for {report.canary_percent}% of users beside {report.previous}; "
            f"`python -m export publish --version {args.version}` promotes it, `python -m export rollback` ends it"
        )
        return 0
    print(
        f"published {report.version} (loaded in {report.loaded_s:.1f} s, lists pre-computed in "
        f"{report.precomputed_s:.1f} s; Triton folders added: {[str(p) for p in report.served] or 'none'}); "
        f"active now, replacing {report.previous or 'nothing'} (`python -m export rollback` goes back)"
    )
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    replaced, active = run_on(target_of(args), release.rollback)
    print(f"rolled back: {active} is active again (replacing {replaced})")
    return 0


def _cmd_retire(args: argparse.Namespace) -> int:
    name = str(release.bundle_manifest(_bundle_dir(args))["model_version"])
    target = target_of(args)
    dropped, removed = run_on(
        target,
        lambda backend: release.retire(backend, name, target, Path(args.repo), args.drop_rollback_target),
    )
    print(f"retired {name}: {dropped} keys deleted, Triton folders removed: {[str(p) for p in removed] or 'none'}")
    return 0


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stack-env", default=str(BUILD_DIR / "stack.env"), help="the running stack's settings (default %(default)s)"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("RECSERVE_REDIS_URLS") or None,
        help="comma-separated redis:// URLs instead of the stack's (default: $RECSERVE_REDIS_URLS, if set)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        default=os.environ.get("RECSERVE_REDIS_MODE") == "cluster",
        help="--redis names a Redis Cluster node (default: true when $RECSERVE_REDIS_MODE is cluster)",
    )
    parser.add_argument("--triton-http", default=None, help="Triton's HTTP address, to wait until it serves")
    parser.add_argument(
        "--served-repository",
        action="append",
        default=[],
        help="a rendered (cpu profile) repository Triton serves; the version's folder is added there",
    )


def _add_version_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--version", type=int, required=required, help="model version N (`export all --version N`)")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--build-dir", default=str(BUILD_DIR), help="bundles in BUILD_DIR/artifacts/DATASET/vN")
    parser.add_argument("--repo", default=str(MODEL_REPOSITORY), help="the Triton model repository")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    publish = subparsers.add_parser("publish", help="load version N beside the active one, serve, pre-compute, switch")
    _add_version_args(publish)
    _add_target_args(publish)
    publish.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="embedding storage dtype")
    publish.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime threads (pre-compute)")
    publish.add_argument("--served-timeout-s", type=float, default=120.0, help="how long Triton may take to serve N")
    publish.add_argument(
        "--canary", type=int, default=None, metavar="PCT", help="send PCT%% of users (by user id) to N, not all"
    )
    publish.add_argument("--no-progress", action="store_true")
    publish.set_defaults(func=_cmd_publish)

    rollback = subparsers.add_parser(
        "rollback", help="end the canary, or else switch back to the version the last switch replaced"
    )
    _add_target_args(rollback)
    rollback.set_defaults(func=_cmd_rollback)

    retire = subparsers.add_parser("retire", help="drop version N's keys and Triton folders (none may hold it)")
    _add_version_args(retire)
    _add_target_args(retire)
    retire.add_argument(
        "--drop-rollback-target", action="store_true", help="retire it even if `rollback` would return to it"
    )
    retire.set_defaults(func=_cmd_retire)
