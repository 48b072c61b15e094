"""Fixtures of the fault-injection suite: private stacks (Redis shards, a Redis Cluster with replicas, a
Triton of its own) that the tests may kill, and the summary table printed at the end of the run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stack.redis_local import RedisServer, start_server
from tests.conftest import Exported, Stack
from tests.faults.harness import FIGURES_DIR
from tests.faults.report import load_figures, render
from tests.redis_harness import require_redis

_SESSION_STARTED = time.time()


def triton_repo(exported: Exported, folder: Path) -> Path:
    from export.model_repository import render_profile_repository
    from export.triton_config import ranker_models

    return render_profile_repository(
        "cpu", folder, exported.repo, models=ranker_models(exported.bundle.dim, exported.batching)
    )


def load_stack(redis: Any, stack: Stack) -> None:
    """Load the small model and pre-compute every user's list into ``redis`` (URL(s) or a backend)."""
    from export.dataplane import load_and_precompute

    asyncio.run(load_and_precompute(redis, stack.exported.bundle, stack.onnx_path, progress=False))


@pytest.fixture
def aof_redis(stack: Stack) -> Iterator[RedisServer]:
    """A private, loaded redis-server with an append-only file: this test may kill and restart it."""
    require_redis()
    server = start_server(appendonly=True)
    try:
        load_stack(server.url, stack)
        yield server
    finally:
        server.stop()


def users(stack: Stack) -> list[str]:
    return list(stack.exported.bundle.user_ids)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    fresh = [f for f in load_figures() if (FIGURES_DIR / f"{f['name']}.json").stat().st_mtime >= _SESSION_STARTED]
    if fresh:
        terminalreporter.write_sep("=", "fault-injection figures (build/faults/*.json)")
        terminalreporter.write_line(render(fresh))
