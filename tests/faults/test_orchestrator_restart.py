"""The orchestrator SIGKILLed while events stream in, then restarted: every event it acknowledged (202)
is in the Redis Stream. Events in flight at the kill got no answer, so their clients retry them
(at least once); none was acknowledged and then dropped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.store import keys
from stack.launch import free_port, start_orchestrator
from tests.conftest import Stack
from tests.faults.conftest import users
from tests.faults.harness import EventLoad, Figures, stream_ids

pytestmark = [pytest.mark.faults, pytest.mark.integration]
RATE, WORKERS = 60.0, 3


def test_no_accepted_event_is_lost_when_the_orchestrator_is_killed(stack: Stack, triton: Any, tmp_path: Path) -> None:
    figures = Figures(
        "orchestrator_killed_events",
        "orchestrator SIGKILLed mid-stream of events, then restarted on the same port",
        f"POST /v1/events at {RATE:g}/s from {WORKERS} clients",
        ".venv/bin/pytest -m faults -s tests/faults/test_orchestrator_restart.py",
    )
    env = stack.env(triton.grpc_url, RECSERVE_EVENTS_RATE_PER_S="1000")
    port = free_port()
    app = start_orchestrator(env, port, log_path=tmp_path / "app.log")
    try:
        with EventLoad(app.url, users(stack), RATE, WORKERS) as load:
            load.wait_for(60)
            app.process.kill()  # SIGKILL: no shutdown hook runs
            app.process.wait()
            killed = time.monotonic()
            at_kill = len(load.accepted)
            app = start_orchestrator(env, port, log_path=tmp_path / "app2.log")
            restart_s = time.monotonic() - killed
            load.wait_for(at_kill + 60)
        stored = stream_ids(stack.redis.url, keys.EVENTS_STREAM)
        lost = set(load.accepted) - stored
        assert not lost, f"{len(lost)} accepted events missing from the stream: {sorted(lost)[:5]}"
        assert len(set(load.accepted)) == len(load.accepted)
        figures.facts.update(
            {
                "events accepted (202)": len(load.accepted),
                "accepted and found in the stream": len(set(load.accepted) & stored),
                "refused or unanswered during the restart (retried by clients)": dict(load.refused),
                "orchestrator ready again after": f"{restart_s:.2f} s",
            }
        )
        figures.lost = f"{len(lost)} of {len(load.accepted)} accepted events"
    finally:
        app.stop()
    figures.write()
