"""``python -m stack <command>``: the local stack's CLI.

``up`` (``make up``): the whole stack, a crashed orchestrator restarted within a bound, Ctrl-C stops it;
``triton``: the cpu profile on a local tritonserver; ``plan ARGS``: ``python -m export plan ARGS`` measured
(``--measure``) in a throw-away Redis.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

from export.errors import ExportError
from stack.errors import StackError
from stack.supervise import RestartPolicy


def _cmd_up(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from stack import up

    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s)
    return up.run(args.dataset, args.port, use_triton=not args.no_triton, policy=policy)


def _cmd_triton(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from export.model_repository import render_profile_repository
    from stack.triton_launcher import TritonServer

    repo = render_profile_repository("cpu")
    with TritonServer(repo) as server:
        print(f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}")
        print(f"log: {server.log_path}; Ctrl-C stops it", flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                threading.Event().wait(1)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_plan(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """``python -m export plan REST --redis URL``, URL a redis-server started for it and stopped after."""
    from export import cli_dataplane
    from stack.redis_local import start_server

    if "--redis" in rest or any(arg.startswith("--redis=") for arg in rest):
        raise StackError(
            "`python -m stack plan` starts its own Redis: leave out --redis, or run `python -m export plan`"
        )
    # export's own plan command, parsed here so that its --help and errors read `python -m stack plan`.
    parser = argparse.ArgumentParser(prog="python -m stack")
    cli_dataplane.add_commands(parser.add_subparsers(dest="command", required=True))
    plan_args = parser.parse_args(["plan", *rest])
    server = start_server()
    try:
        plan_args.redis = server.url
        return int(plan_args.func(plan_args))
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="the whole local stack: Redis, Triton, load, pre-compute, orchestrator")
    up.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic (default), movielens, movielens-small, or the NAME of an own data set "
        "(python -m export all --interactions FILE --name NAME)",
    )
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--no-triton", action="store_true", help="rank in process with ONNX Runtime instead")
    up.add_argument(
        "--max-restarts",
        type=int,
        default=RestartPolicy.max_restarts,
        help="restarts of a crashed orchestrator allowed within --restart-window-s; one crash more stops the stack",
    )
    up.add_argument("--restart-window-s", type=float, default=RestartPolicy.window_s)
    up.set_defaults(func=_cmd_up)

    triton = commands.add_parser("triton", help="serve the cpu profile with a local tritonserver")
    triton.set_defaults(func=_cmd_triton)

    plan = commands.add_parser(
        "plan",
        help="`python -m export plan` against a throw-away redis-server (for --measure); takes plan's arguments",
        add_help=False,
    )
    plan.set_defaults(func=_cmd_plan, passes_through=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args, rest))
    except (StackError, ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
