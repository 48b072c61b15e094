"""Section "service" of ``make bench``: the orchestrator over HTTP on a real Redis and a real Triton,
cache-hit traffic and cache-miss traffic (ranked on Triton), with the per-stage breakdown of a miss.

A closed-loop ``httpx`` client on the same cores drives it; locust step-load runs live in ``loadtest/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.runner import (
    BenchContext,
    Measured,
    SectionResult,
    format_rate,
    markdown_table,
    median,
    percentile,
    ratio,
)
from export.artifacts import load_bundle
from export.dataplane import default_onnx_model, load_and_precompute
from export.model_repository import render_profile_repository
from export.triton_config import BatchingSpec
from stack.launch import HttpService, free_port, start_orchestrator
from stack.redis_local import start_server
from stack.triton_launcher import TritonServer
from stack.up import ensure_artifacts

STAGES = ("cache", "user_features", "retrieval", "item_features", "ranking")
# The gpu-t4 profile's queue delay, which the batching study advises against on the cpu profile: the miss
# path is measured with it in the same run as with the shipped 0 ms, so that both share the machine's load.
COMPARED_DELAY_US = 5000
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of ``pid`` and its live descendants (Triton's Python stubs), from /proc."""
    total, pending, seen = 0.0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            raw = Path(f"/proc/{current}/stat").read_text()
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
        total += (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime
        for task in tasks:
            with contextlib.suppress(OSError):
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return total


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    stages_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    errors: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0  # orchestrator + Triton (with its stubs) + Redis, while the row ran
    cpu_s_by_process: tuple[float, ...] = ()  # the same, per server process (in server_pids' order)

    def cpu_ms_per_request(self) -> str:
        """CPU ms per answered request of each server process, ``a / b / c``."""
        n = max(1, len(self.latencies_ms))
        return " / ".join(f"{1000 * cpu / n:.2f}" for cpu in self.cpu_s_by_process) or "-"

    @property
    def per_cpu_second(self) -> float:
        """Requests per server CPU-second: what carries over to a pod with cores of its own."""
        return len(self.latencies_ms) / self.server_cpu_s if self.server_cpu_s else 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


async def drive(base: str, users: list[str], concurrency: int, seconds: float, debug: bool) -> Run:
    """``concurrency`` closed-loop clients for ``seconds``, each asking for a random user's list."""
    run = Run()
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=5.0, limits=limits) as client:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                params = {"n": "20", "page_type": "home", "device": "web", "debug": "true" if debug else "false"}
                started = time.perf_counter()
                response = await client.get(f"/v1/recommendations/{rng.choice(users)}", params=params)
                elapsed_ms = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    run.errors += 1
                    continue
                body = response.json()
                run.latencies_ms.append(elapsed_ms)
                run.sources[body["source"]] += 1
                for stage, value in body.get("timings_ms", {}).items():
                    if stage in run.stages_ms:
                        run.stages_ms[stage].append(float(value))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - started
    return run


def prime_cache(base: str, users: list[str], passes: int = 1, concurrency: int = 1) -> dict[str, int]:
    """Ask for every user's home/web list, ``concurrency`` at a time, so that it is cached before
    measuring; further passes catch answers that were fallbacks (never cached). Returns the sources."""
    sources: Counter[str] = Counter()

    async def worker(client: httpx.AsyncClient, pending: list[str]) -> None:
        while pending:
            response = await client.get(f"/v1/recommendations/{pending.pop()}?page_type=home&device=web")
            sources[str(response.json().get("source")) if response.status_code == 200 else "error"] += 1

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            for _ in range(passes):
                pending = list(users)
                await asyncio.gather(*(worker(client, pending) for _ in range(concurrency)))

    asyncio.run(run())
    return dict(sources)


def measured_drive(
    base: str, users: list[str], concurrency: int, seconds: float, debug: bool, server_pids: list[int]
) -> Run:
    """``drive``, with the CPU seconds the server processes used meanwhile."""
    cpu_before = [tree_cpu_seconds(pid) for pid in server_pids]
    run = asyncio.run(drive(base, users, concurrency, seconds, debug))
    run.cpu_s_by_process = tuple(tree_cpu_seconds(pid) - b for pid, b in zip(server_pids, cpu_before, strict=True))
    run.server_cpu_s = sum(run.cpu_s_by_process)
    return run


def _row(label: str, concurrency: int, run: Run) -> list[object]:
    mix = ", ".join(f"{k} {v / max(1, sum(run.sources.values())):.0%}" for k, v in run.sources.most_common())
    return [
        label,
        concurrency,
        format_rate(run.rps),
        f"{median(run.latencies_ms):.1f}",
        f"{percentile(run.latencies_ms, 99):.1f}",
        format_rate(run.per_cpu_second) if run.server_cpu_s else "-",
        run.errors,
        mix,
    ]


@dataclass(frozen=True)
class MissConfig:
    key: str
    label: str
    batching: BatchingSpec | None  # None: the cpu profile as shipped
    env: Mapping[str, str] = field(default_factory=dict)  # the orchestrator's settings that differ from shipped
    contrast: str = ""  # what it shows against the shipped configuration, for the comparison table's title


MISS_CONFIGS = (
    MissConfig("shipped", "cache miss, ranked on Triton (no cache)", None),
    MissConfig(
        f"{COMPARED_DELAY_US // 1000}ms-delay",
        f"cache miss, Triton at {COMPARED_DELAY_US // 1000} ms queue delay (the gpu-t4 profile's)",
        BatchingSpec(max_queue_delay_microseconds=COMPARED_DELAY_US),
        contrast=f"{COMPARED_DELAY_US // 1000} ms queue delay -> shipped (0 ms)",
    ),
    MissConfig(
        "rows-from-redis",
        "cache miss, every candidate's rows read from Redis (`RECSERVE_CACHE_ITEM_ROWS=0`)",
        None,
        {"RECSERVE_CACHE_ITEM_ROWS": "0"},
        contrast="candidates' rows read from Redis -> kept in process (shipped)",
    ),
)
MISS_CONCURRENCY = (1, 4, 16)


def _comparison(misses: Mapping[tuple[str, int], Run], other: str) -> str:
    """The ``other`` configuration's misses against the shipped one's, per concurrency: ``other -> shipped``."""
    rows = []
    for concurrency in MISS_CONCURRENCY:
        shipped, them = misses["shipped", concurrency], misses[other, concurrency]
        rows.append(
            [
                concurrency,
                f"{median(them.latencies_ms):.1f} -> {median(shipped.latencies_ms):.1f}",
                f"{format_rate(them.rps)} -> {format_rate(shipped.rps)} ({ratio(shipped.rps, them.rps):.2f}x)",
                f"{format_rate(them.per_cpu_second)} -> {format_rate(shipped.per_cpu_second)} "
                f"({ratio(shipped.per_cpu_second, them.per_cpu_second):.2f}x)",
            ]
        )
    return markdown_table(["clients", "p50 ms", "requests/s", "requests per server CPU-s"], rows)


def run_section(ctx: BenchContext) -> SectionResult:
    seconds = 3.0 if ctx.quick else 10.0
    bundle_path = ensure_artifacts("synthetic")
    bundle = load_bundle(bundle_path)
    onnx_path = default_onnx_model(bundle.manifest)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[object]] = []
    stage_rows: list[list[object]] = []
    misses: dict[tuple[str, int], Run] = {}
    measurements: dict[str, Measured] = {}
    load_start = os.getloadavg()[0]
    with ExitStack() as stack:
        redis = start_server()
        stack.callback(redis.stop)
        asyncio.run(load_and_precompute(redis.url, bundle, onnx_path, progress=False))
        tritons: dict[str, TritonServer] = {}
        for config in MISS_CONFIGS:
            folder = ctx.work_dir / f"service-triton-{config.key}"
            repo = render_profile_repository("cpu", folder, embedding_dim=bundle.dim, batching=config.batching)
            tritons[config.key] = TritonServer(repo, log_path=ctx.work_dir / f"service-triton-{config.key}.log").start()
            stack.callback(tritons[config.key].stop)
        base_env = {
            "RECSERVE_REDIS_URLS": redis.url,
            "RECSERVE_INDEX_PATH": str(bundle_path / "item_index.faiss"),
            "RECSERVE_TRITON_URL": tritons["shipped"].grpc_url,
            "RECSERVE_LIMITS_MAX_IN_FLIGHT": "4096",
        }

        def server_pids(app: HttpService, triton: TritonServer) -> list[int]:
            assert triton.process is not None
            return [app.process.pid, triton.process.pid, redis.process.pid]

        hot_users = bundle.user_ids[:200]
        with ExitStack() as app_stack:
            app = start_orchestrator(base_env, free_port(), ctx.work_dir / "service-hit.log")
            app_stack.callback(app.stop)
            prime_cache(app.url, hot_users)
            for concurrency in (1, 8, 32):
                pids = server_pids(app, tritons["shipped"])
                run = measured_drive(app.url, hot_users, concurrency, seconds, False, pids)
                rows.append([*_row("cache hit (200 warm users)", concurrency, run), f"{os.getloadavg()[0]:.2f}"])
                if concurrency == 8:
                    measurements["service_rps_cache_hit_8_clients"] = Measured(round(run.rps, 1), "requests/s")
        miss_env = base_env | {"RECSERVE_ABLATION_CACHE_ENABLED": "false", "RECSERVE_DEADLINE_REQUEST_MS": "1000"}
        with ExitStack() as app_stack:
            apps = {}
            for config in MISS_CONFIGS:
                env = miss_env | {"RECSERVE_TRITON_URL": tritons[config.key].grpc_url, **config.env}
                apps[config.key] = start_orchestrator(env, free_port(), ctx.work_dir / f"service-miss-{config.key}.log")
                app_stack.callback(apps[config.key].stop)
            # Interleaved, so that every configuration meets the same background load.
            for concurrency in MISS_CONCURRENCY:
                for config in MISS_CONFIGS:
                    app, pids = apps[config.key], server_pids(apps[config.key], tritons[config.key])
                    run = measured_drive(app.url, bundle.user_ids, concurrency, seconds, True, pids)
                    misses[config.key, concurrency] = run
                    load = f"{os.getloadavg()[0]:.2f}"
                    rows.append([*_row(config.label, concurrency, run), load])
                    stages = [f"{median(run.stages_ms[s]):.2f}" if run.stages_ms[s] else "-" for s in STAGES]
                    stage_rows.append(
                        [
                            config.key,
                            concurrency,
                            *stages,
                            f"{median(run.latencies_ms):.1f}",
                            run.cpu_ms_per_request(),
                            load,
                        ]
                    )
    shipped_4 = misses["shipped", 4]
    measurements["service_rps_cache_miss_4_clients"] = Measured(round(shipped_4.rps, 1), "requests/s")
    measurements["service_cache_miss_p50_ms_1_client"] = Measured(
        round(median(misses["shipped", 1].latencies_ms), 2), "ms p50 of a cache miss at one client, HTTP included"
    )
    measurements["service_cache_miss_requests_per_server_cpu_s"] = Measured(
        round(shipped_4.per_cpu_second, 1),
        "cache-miss requests per CPU-second of orchestrator + Triton + Redis together, 4 clients",
    )
    comparisons = []
    for config in MISS_CONFIGS[1:]:
        comparisons += [f"Cache misses, {config.contrast}, same run:", "", _comparison(misses, config.key), ""]
    load_end = os.getloadavg()[0]
    markdown = "\n".join(
        [
            "## Orchestrator over HTTP: cache hits and cache misses through Triton",
            "",
            ctx.provenance(),
            "",
            f"One orchestrator process (uvicorn, uvloop, 1 worker), a private redis-server, tritonserver on the cpu "
            f"profile (shipped batching: no queue delay), model `{bundle.model_version}`; a closed-loop httpx client "
            f"on the same 2 cores ({seconds:.0f} s per row; 1-minute load average {load_start:.2f} at the start, "
            f"{load_end:.2f} at the end, and after each row in its last column). Cache-miss rows run with "
            "`RECSERVE_ABLATION_CACHE_ENABLED=false`, so every request retrieves, fetches features and ranks 200 "
            "candidates on Triton; they take turns between the shipped configuration, the same with the gpu-t4 "
            f"profile's {COMPARED_DELAY_US // 1000} ms queue delay, and the same with no item rows kept in process "
            "(each its own orchestrator and tritonserver, idle while another runs), so that all meet the same "
            "background load. Latency is what the client saw, "
            "HTTP included. Per server CPU-s: requests per CPU-second of the orchestrator, tritonserver (with its "
            "Python stubs) and redis-server together, from /proc; the client is not counted.",
            "",
            markdown_table(
                [
                    "traffic",
                    "clients",
                    "requests/s",
                    "p50 ms",
                    "p99 ms",
                    "per server CPU-s",
                    "errors",
                    "sources",
                    "load",
                ],
                rows,
            ),
            "",
            *comparisons,
            "Per-stage breakdown of a cache miss (median ms per stage, from `debug=true` timings; the rest of the "
            "client latency is HTTP, JSON and queueing in the event loop):",
            "",
            markdown_table(
                [
                    "config",
                    "clients",
                    *STAGES,
                    "client p50 ms",
                    "CPU ms/request: orchestrator / Triton / Redis",
                    "load",
                ],
                stage_rows,
            ),
            "",
            "The python client shares the cores with the service, Redis and Triton: for the highest sustainable "
            "throughput at p99 < 100 ms and the ratios against the naive design, see the load-test sections.",
        ]
    )
    return SectionResult(markdown, measurements)
