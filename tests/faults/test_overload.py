"""Overload: beyond ``max_in_flight`` the service answers 503 + Retry-After at once instead of queueing,
and the requests it admitted keep their latency; the Redis pools are bounded and make a burst wait
for a connection rather than fail."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from orchestrator.store.backend import Command, ConnectionOptions
from orchestrator.store.sharded import ShardedBackend
from stack.redis_local import start_server
from tests.conftest import Stack, running_orchestrator
from tests.faults.conftest import users
from tests.faults.harness import CONTEXTS, Figures, Sample, Window, p99
from tests.redis_harness import require_redis

pytestmark = [pytest.mark.faults, pytest.mark.integration]
SLO_MS = 100.0
MAX_IN_FLIGHT, BURST, BURSTS = 4, 48, 5
# The deadline leaves half the SLO for HTTP and for parsing the rest of the burst in the same event loop.
DEADLINE_MS = 50.0
# What the deadline cannot bound: the event loop reading the rest of the burst and computing the admitted
# requests, and other work on the same cores (CI saw 109 ms at p99 for 21 admitted requests; a quiet run
# here 115 ms at p99 for the 503s). Had the service queued instead of shedding, the last of 48 would wait
# 12 admitted requests' time: 300 ms or more, which both bounds below still tell apart.
SCHEDULING_MARGIN_MS = 100.0


async def burst(url: str, user_ids: list[str], offset: int) -> list[tuple[Sample, str | None]]:
    """``BURST`` GETs written at the same moment on connections opened beforehand. Raw HTTP/1.1 over
    asyncio streams: an HTTP client library costs a millisecond or more per request in this process,
    which would spread the burst out and add its own queueing to every latency measured."""
    host, port = url.removeprefix("http://").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(BURST)]

    async def one(k: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[Sample, str | None]:
        user = user_ids[(offset + k) % len(user_ids)]
        page_type, device = CONTEXTS[(offset + k) % len(CONTEXTS)]
        path = f"/v1/recommendations/{user}?page_type={page_type}&device={device}"
        started = time.monotonic()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read()
        latency_ms = (time.monotonic() - started) * 1000
        writer.close()
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        source = orjson.loads(body).get("source", "") if status == 200 else ""
        return Sample(started, latency_ms, status, source), headers.get("retry-after")

    return await asyncio.gather(*(one(k, r, w) for k, (r, w) in enumerate(connections)))


def test_beyond_max_in_flight_requests_are_shed_at_once_and_admitted_ones_keep_their_deadline(
    stack: Stack, triton: Any, tmp_path: Path
) -> None:
    figures = Figures(
        "overload_burst",
        f"bursts of {BURST} concurrent requests against max_in_flight={MAX_IN_FLIGHT}",
        f"{BURSTS} bursts of {BURST} simultaneous GETs (distinct users and contexts, cache off)",
        ".venv/bin/pytest -m faults -s tests/faults/test_overload.py",
    )
    env = stack.env(
        triton.grpc_url,
        RECSERVE_LIMITS_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        RECSERVE_DEADLINE_REQUEST_MS=str(DEADLINE_MS),
        RECSERVE_DEADLINE_FALLBACK_RESERVE_MS="15",
        RECSERVE_ABLATION_CACHE_ENABLED="false",
    )
    with running_orchestrator(env, tmp_path / "app.log") as app:
        # Not measured: the first requests of a fresh process open the Triton channel and page in the index.
        asyncio.run(burst(app.url, users(stack), BURSTS * BURST))
        results: list[tuple[Sample, str | None]] = []
        for k in range(BURSTS):
            results += asyncio.run(burst(app.url, users(stack), k * BURST))
    admitted = [s for s, _ in results if s.status == 200]
    shed = [(s, retry) for s, retry in results if s.status == 503]
    assert len(admitted) + len(shed) == len(results), sorted({s.status for s, _ in results})
    assert admitted and shed
    assert all(retry == "1" for _, retry in shed), "every 503 says when to retry"
    shed_p99 = p99([s.latency_ms for s, _ in shed])
    admitted_window = figures.window("admitted (200)", Window(admitted))
    shed_median = sorted(s.latency_ms for s, _ in shed)[len(shed) // 2]
    # Queued requests would wait for a slot: at least one admitted request's time each, piling up to
    # several deadlines for a burst 12x the limit. Shed ones wait only for the event loop to reach them.
    assert shed_p99 < DEADLINE_MS + SCHEDULING_MARGIN_MS, f"shedding took {shed_p99:.1f} ms at p99: it queued"
    # The SLO itself is a figure (build/faults/overload_burst.json), not an assertion: timing on shared cores.
    assert admitted_window.p99_ms < DEADLINE_MS + SCHEDULING_MARGIN_MS, admitted_window.summary()
    figures.facts.update(
        {
            "shed (503 + Retry-After: 1)": f"{len(shed)} of {len(results)}",
            "503 latency": f"median {shed_median:.1f} ms, p99 {shed_p99:.1f} ms",
            "p99 of admitted": f"{admitted_window.p99_ms:.1f} ms (SLO {SLO_MS:g} ms, deadline {DEADLINE_MS:g} ms)",
        }
    )
    figures.write()


async def test_a_burst_waits_for_a_pooled_connection_instead_of_failing() -> None:
    require_redis()
    server = start_server()
    backend = ShardedBackend.from_urls(
        [server.url], timeout_ms=2000, options=ConnectionOptions(max_connections=2, pool_timeout_s=2.0)
    )
    try:
        await backend.execute([Command("SET", "k", ("v",))])
        replies = await asyncio.gather(*(backend.execute([Command("GET", "k")]) for _ in range(100)))
        assert all(not r.down and r.values == [b"v"] for r in replies)
        clients = redis.Redis(port=server.port).client_list()
        assert len(clients) - 1 <= 2, clients  # minus the redis.Redis asking
    finally:
        await backend.aclose()
        server.stop()


async def test_a_pool_wait_past_its_timeout_counts_as_unavailable_not_a_hang() -> None:
    require_redis()
    server = start_server()
    backend = ShardedBackend.from_urls(
        [server.url], timeout_ms=2000, options=ConnectionOptions(max_connections=1, pool_timeout_s=0.05)
    )
    pool = next(iter(backend._clients.values())).connection_pool
    held = await pool.get_connection()  # the only connection, taken as a long command would
    try:
        started = time.monotonic()
        replies = await backend.execute([Command("GET", "k")])
        assert replies.down and time.monotonic() - started < 1.0
        await pool.release(held)
        assert not (await backend.execute([Command("GET", "k")])).down
    finally:
        await backend.aclose()
        server.stop()
