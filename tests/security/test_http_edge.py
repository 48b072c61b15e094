"""The HTTP layer's limits against the real orchestrator process (``python -m orchestrator``, served by
``orchestrator/edge.py``), over raw sockets: 431 for oversized and too many headers, slow and idle
connections closed, 408 for a stalled body, hundreds of stalled bodies while normal requests keep
answering 200, a cap on open connections, /metrics rendered at most once per interval, and no API key in
the orchestrator's command line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from orchestrator.api.health import METRICS_INTERVAL_S
from tests.conftest import TEST_API_KEY, Stack, running_orchestrator

pytestmark = pytest.mark.integration

MAX_HEADER_BYTES = 4096
MAX_HEADERS = 24
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 1.0
MAX_CONNECTIONS = 400
MAX_IN_FLIGHT = 16  # far fewer than the stalled bodies below: were a stalled body to hold a slot, GETs would 503
STALLED_BODIES = 300
SLACK_S = 3.0  # for a shared 2-core machine


@pytest.fixture(scope="module")
def edge_app(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = stack.env(
        None,
        RECSERVE_LIMITS_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        RECSERVE_LIMITS_MAX_HEADERS=str(MAX_HEADERS),
        RECSERVE_LIMITS_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        RECSERVE_LIMITS_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        RECSERVE_LIMITS_KEEP_ALIVE_S=str(KEEP_ALIVE_S),
        RECSERVE_LIMITS_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        RECSERVE_LIMITS_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        RECSERVE_EVENTS_BURST=str(10 * STALLED_BODIES),  # the stalled events below are not rate-limited first
    )
    with running_orchestrator(env, tmp_path_factory.mktemp("edge") / "app.log") as app:
        app.port = urlsplit(app.url).port
        yield app


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: t", *headers, "", ""]).encode()


def stalled_event() -> bytes:
    """An event whose headers are complete but whose body stops 20 bytes in (of 64 announced)."""
    head = "\r\n".join(
        [
            "POST /v1/events HTTP/1.1",
            "Host: t",
            f"X-API-Key: {TEST_API_KEY}",
            "Content-Type: application/json",
            "Content-Length: 64",
            "",
            "",
        ]
    )
    return head.encode() + b'{"user_id": "5", "it'


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


async def until_closed(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def exchange(port: int, request: bytes, timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send ``request``, read until the server closes: what it said and after how long."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    try:
        writer.write(request)
        await writer.drain()
        return await until_closed(reader, timeout_s), time.monotonic() - start
    finally:
        writer.close()


async def test_oversized_headers_are_431_and_the_connection_is_closed(edge_app: Any) -> None:
    response, _ = await exchange(edge_app.port, get("/v1/recommendations/5", "X-Big: " + "a" * MAX_HEADER_BYTES))
    assert status_of(response) == 431
    assert b"exceed 4096" in response and b"connection: close" in response.lower()


async def test_too_many_headers_are_431(edge_app: Any) -> None:
    many = [f"X-H{i}: {i}" for i in range(MAX_HEADERS + 1)]
    response, _ = await exchange(edge_app.port, get("/v1/recommendations/5", *many))
    assert status_of(response) == 431
    assert f"more than {MAX_HEADERS} header lines".encode() in response
    within, _ = await exchange(
        edge_app.port, get("/v1/recommendations/5", *many[: MAX_HEADERS - 2], "Connection: close")
    )
    assert status_of(within) == 200


async def test_a_header_that_never_ends_is_cut_off_near_the_limit(edge_app: Any) -> None:
    """The probe that froze the service (one 64 MiB header): the server stops reading near the limit."""
    _, writer = await asyncio.open_connection("127.0.0.1", edge_app.port)
    sent = 0
    try:
        writer.write(b"GET /v1/recommendations/5 HTTP/1.1\r\nX-Big: ")
        async with asyncio.timeout(10):
            while sent < 64 * 2**20:
                writer.write(b"a" * 65536)
                await writer.drain()
                sent += 65536
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    # Closed after the limit plus a read or two, plus what the kernel's socket buffers held.
    assert sent < 16 * 2**20, f"the server still read a header after {sent} bytes"


async def test_a_client_sending_headers_byte_by_byte_is_closed(edge_app: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge_app.port)
    start = time.monotonic()
    request = get("/v1/recommendations/5", "X-Slow: " + "s" * 10_000)
    closed = asyncio.create_task(until_closed(reader, HEADER_TIMEOUT_S + SLACK_S))
    try:
        for byte in request:  # far longer than the header timeout at one byte per 50 ms
            if closed.done() or writer.is_closing():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.05)
        response = await closed
    finally:
        writer.close()
    elapsed = time.monotonic() - start
    assert HEADER_TIMEOUT_S - 0.2 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S
    assert status_of(response) == 408 and b"request not received within 2 s" in response


async def test_idle_connections_are_closed(edge_app: Any) -> None:
    """A connection that never sends a byte (header timeout, closed without a word), and one idle after a
    request (keep-alive timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", edge_app.port)
    start = time.monotonic()
    assert await until_closed(reader, HEADER_TIMEOUT_S + SLACK_S) == b""
    assert time.monotonic() - start >= HEADER_TIMEOUT_S - 0.2
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", edge_app.port)
    writer.write(get("/healthz"))
    answered = await reader.readuntil(b'{"status":"alive"}')
    start = time.monotonic()
    assert status_of(answered) == 200
    assert await until_closed(reader, KEEP_ALIVE_S + SLACK_S) == b""
    assert time.monotonic() - start >= KEEP_ALIVE_S - 0.2
    writer.close()


async def test_a_stalled_body_is_408_and_the_connection_is_closed(edge_app: Any) -> None:
    response, elapsed = await exchange(edge_app.port, stalled_event())
    assert status_of(response) == 408
    assert b"request body not received within 1.5 s (20 bytes arrived)" in response
    assert BODY_TIMEOUT_S - 0.2 <= elapsed <= BODY_TIMEOUT_S + SLACK_S


async def test_hundreds_of_stalled_bodies_while_normal_requests_keep_answering(edge_app: Any) -> None:
    """The probe that made every call 503: hundreds of bodies that never arrive. Now they hold no admission
    slot (max_in_flight is 16): every normal request meanwhile answers 200, /readyz stays ready, and every
    stalled one is answered 408 within the body timeout (bounded, not left open)."""
    port = edge_app.port
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(STALLED_BODIES)]
    start = time.monotonic()
    for _, writer in connections:
        writer.write(stalled_event())
    await asyncio.gather(*(writer.drain() for _, writer in connections))
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=edge_app.url, timeout=5) as client:
        while time.monotonic() - start < BODY_TIMEOUT_S + 0.5:
            answers = await asyncio.gather(*(client.get(f"/v1/recommendations/{u}") for u in range(1, 9)))
            statuses += [a.status_code for a in answers]
            statuses.append((await client.get("/readyz")).status_code)
        answered = await asyncio.gather(*(until_closed(reader, BODY_TIMEOUT_S + 10) for reader, _ in connections))
        after = await client.get("/v1/recommendations/5")
    for _, writer in connections:
        writer.close()
    assert len(statuses) >= 18 and set(statuses) == {200}, statuses
    assert [status_of(r) for r in answered] == [408] * STALLED_BODIES
    assert time.monotonic() - start < BODY_TIMEOUT_S + 15
    assert after.status_code == 200


async def test_connections_beyond_the_cap_are_refused_at_once(edge_app: Any) -> None:
    extra = 10
    opened = [await asyncio.open_connection("127.0.0.1", edge_app.port) for _ in range(MAX_CONNECTIONS + extra)]
    try:

        async def first_words(reader: asyncio.StreamReader) -> bytes:
            try:
                return await asyncio.wait_for(reader.read(200), 1.0)  # well before the header timeout
            except TimeoutError:
                return b""  # still open, idle

        said = await asyncio.gather(*(first_words(reader) for reader, _ in opened))
    finally:
        for _, writer in opened:
            writer.close()
    refused = [words for words in said if words]
    assert extra <= len(refused) <= extra + 2, len(refused)
    assert all(status_of(words) == 503 for words in refused)
    assert b"400 connections open already" in refused[0]


async def test_metrics_are_rendered_at_most_once_per_interval(edge_app: Any) -> None:
    def renders(text: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith("recserve_metrics_renders_total "))
        return float(line.split()[1])

    async with httpx.AsyncClient(base_url=edge_app.url, timeout=10) as client:
        before = renders((await client.get("/metrics")).text)
        start = time.monotonic()
        scrapes = await asyncio.gather(*(client.get("/metrics") for _ in range(200)))
        elapsed = time.monotonic() - start
        after = renders((await client.get("/metrics")).text)
    assert {s.status_code for s in scrapes} == {200}
    # 201 scrapes; at most one render per interval that passed (+1 for the interval they started in).
    assert after - before <= elapsed / METRICS_INTERVAL_S + 2, (after - before, elapsed)


def test_no_secret_in_the_orchestrators_command_line(edge_app: Any) -> None:
    """The API keys reach the orchestrator in its environment (/proc/<pid>/environ: its own user only)."""
    assert TEST_API_KEY not in Path(f"/proc/{edge_app.pid}/cmdline").read_text(errors="replace")
