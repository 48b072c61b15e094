"""Tools of the fault-injection suite: bounded background load over real HTTP, a TCP proxy that delays
what a server sends back, and the figures each fault writes to build/faults/<name>.json.

The load is small on purpose (a few concurrent loopback clients at a paced rate, stopped after a hard
time limit) so that the suite measures the service's behaviour under a fault, not the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from export.artifacts import BUILD_DIR
from tests.conftest import API_HEADERS
from tests.waiting import poll

FIGURES_DIR = BUILD_DIR / "faults"
CONTEXTS = [(p, d) for p in ("home", "product", "cart", "search", "category") for d in ("web", "ios", "android", "tv")]


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic send time
    latency_ms: float
    status: int  # 0: no HTTP answer (connection refused/reset, client timeout)
    source: str  # the answer's `source`, or "" for non-200


def p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Window:
    """What a stretch of the load saw."""

    samples: list[Sample]

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def errors(self) -> int:
        """5xx and requests that got no answer at all."""
        return sum(1 for s in self.samples if s.status >= 500 or s.status == 0)

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else math.nan

    @property
    def p99_ms(self) -> float:
        return p99([s.latency_ms for s in self.samples])

    @property
    def sources(self) -> Counter[str]:
        return Counter(s.source for s in self.samples if s.status == 200)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4) if self.count else None,
            "p99_ms": round(self.p99_ms, 1) if self.count else None,
            "sources": dict(self.sources),
        }


class BackgroundLoad:
    """Runs ``_run`` (a coroutine) on a thread of its own from ``__enter__`` until ``stop``: the load
    keeps going while the test blocks on kills and restarts."""

    name = "background-load"
    max_s: float
    join_slack_s = 10.0

    def _init_thread(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=self.name, daemon=True)

    async def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.max_s + self.join_slack_s)


class Load(BackgroundLoad):
    """GET /v1/recommendations for random users and contexts from ``workers`` clients at about
    ``rate_per_s`` requests per second in all, on a thread of its own, until ``stop()`` or ``max_s``."""

    def __init__(
        self,
        base_url: str | Callable[[], str],
        users: list[str],
        rate_per_s: float = 40.0,
        workers: int = 4,
        max_s: float = 60.0,
        timeout_s: float = 5.0,
        seed: int = 0,
    ) -> None:
        self.base_url = base_url if callable(base_url) else (lambda: base_url)
        self.users = users
        self.interval_s = workers / rate_per_s
        self.workers = workers
        self.max_s = max_s
        self.timeout_s = timeout_s
        self.random = random.Random(seed)
        self.samples: list[Sample] = []
        self.name = "fault-load"
        self.join_slack_s = timeout_s + 5
        self._init_thread()

    def since(self, t: float, until: float | None = None) -> Window:
        samples = list(self.samples)
        return Window([s for s in samples if s.t >= t and (until is None or s.t < until)])

    def wait_for(self, count: int, since: float, timeout_s: float = 30.0) -> None:
        """Block until ``count`` answers sent after ``since`` came back (polling, with a deadline)."""
        deadline = time.monotonic() + timeout_s
        while self.since(since).count < count:
            assert self._thread.is_alive(), "the load thread ended early"
            assert time.monotonic() < deadline, f"only {self.since(since).count} of {count} answers in {timeout_s} s"
            self._stop.wait(0.02)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            ends = time.monotonic() + self.max_s
            await asyncio.gather(*(self._worker(client, ends) for _ in range(self.workers)))

    async def _worker(self, client: httpx.AsyncClient, ends: float) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < ends:
            user = self.random.choice(self.users)
            page_type, device = self.random.choice(CONTEXTS)
            url = f"{self.base_url()}/v1/recommendations/{user}"
            started = time.monotonic()
            status, source = 0, ""
            try:
                response = await client.get(url, params={"n": 10, "page_type": page_type, "device": device})
                status = response.status_code
                if status == 200:
                    source = response.json()["source"]
            except httpx.HTTPError:
                pass
            self.samples.append(Sample(started, (time.monotonic() - started) * 1000, status, source))
            # Paced, not back-to-back: a fixed offered load whatever the latency (open-loop-ish).
            next_at += self.interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def metric(base_url: str, name: str, labels: str = "") -> float:
    """One sample of the Prometheus text at /metrics (0 if absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@dataclass
class Figures:
    """One fault's measured figures, written to build/faults/<name>.json for the report."""

    name: str
    fault: str
    load: str
    command: str
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    lost: str = "nothing"

    def window(self, label: str, window: Window) -> Window:
        self.windows[label] = window.summary()
        return window

    def write(self) -> Path:
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        path = FIGURES_DIR / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path


class DelayProxy:
    """Forwards loopback TCP to ``target`` and holds everything the target sends back for ``delay_s``
    (settable at any time): a slow server, seen from the client, without touching the server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.delay_s = 0.0
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._serve, name="delay-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
            # Each chunk is released ``delay_s`` after it arrived, in order: latency added, throughput kept.
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def release() -> None:
                while True:
                    arrived, chunk = await queue.get()
                    if not chunk:
                        break
                    await asyncio.sleep(max(0.0, arrived + self.delay_s - time.monotonic()))
                    writer.write(chunk)
                    await writer.drain()

            releaser = asyncio.ensure_future(release())
            try:
                while chunk := await reader.read(65536):
                    if delayed:
                        queue.put_nowait((time.monotonic(), chunk))
                    else:
                        writer.write(chunk)
                        await writer.drain()
            except OSError:
                pass
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(OSError):
                await releaser
            writer.close()

        await asyncio.gather(pump(client_r, server_w, False), pump(server_r, client_w, True))


class EventLoad(BackgroundLoad):
    """POST /v1/events at about ``rate_per_s`` from ``workers`` clients on a thread of its own; keeps the
    ids of the events the service accepted (202) and counts everything else."""

    def __init__(
        self, base_url: str, users: list[str], rate_per_s: float = 60.0, workers: int = 3, max_s: float = 60.0
    ) -> None:
        self.base_url = base_url
        self.users = users
        self.interval_s = workers / rate_per_s
        self.workers = workers
        self.max_s = max_s
        self.random = random.Random(1)
        self.accepted: list[str] = []
        self.refused: Counter[int] = Counter()  # status -> count; 0: no answer (connection refused/reset)
        self.name = "event-load"
        self._init_thread()

    def wait_for(self, accepted: int, timeout_s: float = 30.0) -> None:
        poll(lambda: len(self.accepted) >= accepted, timeout_s, f"{accepted} accepted events")

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0, headers=API_HEADERS) as client:
            ends = time.monotonic() + self.max_s
            await asyncio.gather(*(self._worker(client, ends) for _ in range(self.workers)))

    async def _worker(self, client: httpx.AsyncClient, ends: float) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < ends:
            body = {
                "user_id": self.random.choice(self.users),
                "item_id": str(self.random.randrange(400)),
                "type": "view",
            }
            try:
                response = await client.post(f"{self.base_url}/v1/events", json=body)
                if response.status_code == 202:
                    self.accepted.append(response.json()["id"])
                else:
                    self.refused[response.status_code] += 1
            except httpx.HTTPError:
                self.refused[0] += 1
            # Paced like Load: a fixed offered rate of events whatever the answers take.
            next_at += self.interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def stream_ids(redis_url: str, stream: str) -> set[str]:
    """Every entry id in a Redis Stream."""
    import redis

    entries: Any = redis.Redis.from_url(redis_url).xrange(stream)
    return {entry_id.decode() for entry_id, _ in entries}
