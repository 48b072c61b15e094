"""Triton killed (SIGKILL) and slowed under load: answers keep coming, within the deadline, from the
fallbacks; the circuit breaker keeps calls off the dead ranker and lets realtime ranking resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from stack.triton_launcher import TritonServer
from tests.conftest import Stack, running_orchestrator
from tests.faults.conftest import triton_repo, users
from tests.faults.harness import DelayProxy, Figures, Load, metric
from tests.waiting import poll

pytestmark = [pytest.mark.faults, pytest.mark.integration]
DEADLINE_MS, RESERVE_MS = 300, 100
# HTTP, JSON and scheduling on a shared 2-core machine, on top of the deadline.
MARGIN_MS = 150
BREAKER_RESET_S = 1.0
RATE, WORKERS = 40.0, 4
# No recommendation cache here: every request goes to the ranker, so the figures measure the ranker
# fault itself rather than how many answers the cache happened to hold.
NO_CACHE = {"RECSERVE_ABLATION_CACHE_ENABLED": "false"}


def readyz(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/readyz", timeout=5).json()
    return body


def test_triton_killed_under_load_falls_back_then_resumes_realtime(stack: Stack, tmp_path: Path) -> None:
    figures = Figures(
        "triton_killed",
        "Triton SIGKILLed, restarted 3 s later on the same ports",
        f"{RATE:g} req/s, {WORKERS} clients, random users and contexts, cache off",
        ".venv/bin/pytest -m faults -s tests/faults/test_triton_faults.py -k killed",
    )
    repo = triton_repo(stack.exported, tmp_path / "cpu")
    triton = TritonServer(repo, log_path=tmp_path / "triton.log").start()
    env = stack.env(
        triton.grpc_url,
        RECSERVE_DEADLINE_REQUEST_MS=str(DEADLINE_MS),
        RECSERVE_DEADLINE_FALLBACK_RESERVE_MS=str(RESERVE_MS),
        RECSERVE_TRITON_BREAKER_FAILURES="5",
        RECSERVE_TRITON_BREAKER_RESET_S=str(BREAKER_RESET_S),
        **NO_CACHE,
    )
    restarted: TritonServer | None = None
    try:
        with running_orchestrator(env, tmp_path / "app.log") as app, Load(app.url, users(stack), RATE, WORKERS) as load:
            t0 = time.monotonic()
            load.wait_for(40, t0)
            before = figures.window("before", load.since(t0))
            assert before.errors == 0 and before.sources["realtime"] > 0, before.summary()

            errors_at_kill = metric(app.url, "recserve_ranker_errors_total")
            triton.kill()
            killed = time.monotonic()
            # The breaker opens after 5 failures: wait until /readyz says so (polling, bounded).
            opened_s = poll(lambda: "circuit open" in readyz(app.url)["components"]["ranker"], 10, "circuit open")
            load.wait_for(int(3 * RATE), killed)  # three seconds of traffic against a dead Triton
            dead = figures.window("Triton dead", load.since(killed))
            errors_while_dead = metric(app.url, "recserve_ranker_errors_total") - errors_at_kill
            dead_s = time.monotonic() - killed
            assert dead.errors == 0, dead.summary()
            assert dead.p99_ms < DEADLINE_MS + MARGIN_MS, dead.summary()
            computed = dead.sources["precomputed"] + dead.sources["realtime"] + dead.sources["popular"]
            assert dead.sources["precomputed"] >= 0.9 * computed, dead.summary()
            # Breaker: failures until it opened, then at most one probe per reset period, not one per request.
            assert errors_while_dead <= 5 + dead_s / BREAKER_RESET_S + 3, (errors_while_dead, dead.summary())
            assert errors_while_dead < computed / 4, (errors_while_dead, dead.summary())

            restarted = TritonServer(
                repo, log_path=tmp_path / "triton2.log", ports=(triton.http_port, triton.grpc_port, triton.metrics_port)
            ).start()
            back = time.monotonic()
            resumed_s = poll(lambda: load.since(back).sources["realtime"] > 0, 15, "realtime after the restart")
            load.wait_for(int(2 * RATE), back)
            after = figures.window("after restart", load.since(back))
            assert after.errors == 0, after.summary()
            assert poll(lambda: readyz(app.url)["components"]["ranker"] == "ok (triton)", 10, "ranker ok") < 10
            figures.facts.update(
                {
                    "circuit open after kill": f"{opened_s:.2f} s",
                    "ranker calls failed while dead": f"{errors_while_dead:g} in {dead_s:.1f} s ({computed} answers)",
                    "realtime again after Triton ready": f"{resumed_s:.2f} s",
                }
            )
    finally:
        triton.stop()
        if restarted is not None:
            restarted.stop()
    figures.write()


def test_triton_slowed_keeps_p99_within_the_deadline_and_falls_back(stack: Stack, triton: Any, tmp_path: Path) -> None:
    figures = Figures(
        "triton_slowed",
        f"Triton slowed: every gRPC reply held {2 * DEADLINE_MS} ms by a delaying proxy (2x the deadline)",
        f"{RATE:g} req/s, {WORKERS} clients, random users and contexts, cache off",
        ".venv/bin/pytest -m faults -s tests/faults/test_triton_faults.py -k slowed",
    )
    host, port = triton.grpc_url.rsplit(":", 1)
    with DelayProxy(host, int(port)) as proxy:
        env = stack.env(
            proxy.address,
            RECSERVE_DEADLINE_REQUEST_MS=str(DEADLINE_MS),
            RECSERVE_DEADLINE_FALLBACK_RESERVE_MS=str(RESERVE_MS),
            RECSERVE_TRITON_BREAKER_RESET_S=str(BREAKER_RESET_S),
            **NO_CACHE,
        )
        with running_orchestrator(env, tmp_path / "app.log") as app, Load(app.url, users(stack), RATE, WORKERS) as load:
            t0 = time.monotonic()
            load.wait_for(40, t0)
            before = figures.window("before", load.since(t0))
            assert before.errors == 0 and before.sources["realtime"] > 0, before.summary()
            proxy.delay_s = 2 * DEADLINE_MS / 1000
            slowed = time.monotonic()
            load.wait_for(int(4 * RATE), slowed)
            slow = figures.window("Triton slow", load.since(slowed))
            assert slow.errors == 0, slow.summary()
            assert slow.p99_ms < DEADLINE_MS + MARGIN_MS, slow.summary()
            assert slow.sources["realtime"] == 0, slow.summary()
            assert slow.sources["precomputed"] > 0, slow.summary()
            # Past their deadline (deadline, or loop_late on a busy machine), refused by an open circuit
            # (ranker_unavailable), or not started once the admission limit had backed off (shed).
            deadline_fallbacks = sum(
                metric(app.url, "recserve_fallbacks_total", f'reason="{reason}"')
                for reason in ("deadline", "loop_late", "ranker_unavailable", "shed")
            )
            assert deadline_fallbacks >= slow.sources["precomputed"]
            proxy.delay_s = 0.0
            healed = time.monotonic()
            resumed_s = poll(lambda: load.since(healed).sources["realtime"] > 0, 15, "realtime after the delay ended")
            figures.facts.update(
                {"deadline": f"{DEADLINE_MS} ms", "realtime again after the delay ended": f"{resumed_s:.2f} s"}
            )
    figures.write()
