"""Where the release commands go: the stack of build/stack.env (as `make up` writes it), or --redis."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from export.cli_release import add_commands, target_of
from export.release import ReleaseError, Target
from stack.env_file import write_stack_env


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_the_commands_find_the_stack_through_its_env_file(tmp_path: Path) -> None:
    env = tmp_path / "stack.env"
    write_stack_env(
        env,
        {
            "RECSERVE_REDIS_URLS": "redis://127.0.0.1:7001/0,redis://127.0.0.1:7002/0",
            "STACK_TRITON_HTTP_URL": "http://127.0.0.1:8000",
            "STACK_TRITON_REPOSITORY": "/srv/triton cpu",  # a space survives the shell quoting
            "RECSERVE_EVENTS_API_KEYS": "stack:not-read-here",
        },
    )
    target = target_of(parse("publish", "--version", "2", "--stack-env", str(env)))
    assert target == Target(
        ["redis://127.0.0.1:7001/0", "redis://127.0.0.1:7002/0"],
        triton_http_url="http://127.0.0.1:8000",
        served_repositories=[Path("/srv/triton cpu")],
    )


def test_explicit_addresses_need_no_stack_and_no_stack_without_them_says_what_to_do(tmp_path: Path) -> None:
    explicit = target_of(parse("rollback", "--redis", "redis://h:1/0", "--stack-env", str(tmp_path / "none")))
    assert explicit == Target(["redis://h:1/0"])
    with pytest.raises(ReleaseError, match=r"no stack at .*none: start one \(`make up`\) or .* --redis"):
        target_of(parse("rollback", "--stack-env", str(tmp_path / "none")))
