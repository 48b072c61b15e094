"""Section "service" of ``make bench``: the orchestrator over HTTP on a real Redis and a real Triton,
cache-hit traffic and cache-miss traffic (ranked on Triton), with the per-stage breakdown of a miss.

A closed-loop ``httpx`` client on the same cores drives it; locust step-load runs live in ``loadtest/``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import httpx

from bench.runner import BenchContext, Measured, SectionResult, format_rate, markdown_table, median, percentile
from export.artifacts import load_bundle
from export.dataplane import default_onnx_model, load_and_precompute
from export.model_repository import render_profile_repository
from stack.launch import free_port, start_orchestrator
from stack.redis_local import start_server
from stack.triton_launcher import TritonServer
from stack.up import ensure_artifacts

STAGES = ("cache", "user_features", "retrieval", "item_features", "ranking")


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    stages_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    errors: int = 0
    seconds: float = 0.0

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


def _row(label: str, concurrency: int, run: Run) -> list[object]:
    mix = ", ".join(f"{k} {v / max(1, sum(run.sources.values())):.0%}" for k, v in run.sources.most_common())
    return [
        label,
        concurrency,
        format_rate(run.rps),
        f"{median(run.latencies_ms):.1f}",
        f"{percentile(run.latencies_ms, 99):.1f}",
        run.errors,
        mix,
    ]


def run_section(ctx: BenchContext) -> SectionResult:
    seconds = 3.0 if ctx.quick else 10.0
    bundle_path = ensure_artifacts("synthetic")
    bundle = load_bundle(bundle_path)
    onnx_path = default_onnx_model(bundle.manifest)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[object]] = []
    stage_rows: list[list[object]] = []
    measurements: dict[str, Measured] = {}
    with ExitStack() as stack:
        redis = start_server()
        stack.callback(redis.stop)
        asyncio.run(load_and_precompute(redis.url, bundle, onnx_path, progress=False))
        triton = TritonServer(
            render_profile_repository("cpu", ctx.work_dir / "service-triton", embedding_dim=bundle.dim),
            log_path=ctx.work_dir / "service-triton.log",
        ).start()
        stack.callback(triton.stop)
        base_env = {
            "RECSERVE_REDIS_URLS": redis.url,
            "RECSERVE_INDEX_PATH": str(bundle_path / "item_index.faiss"),
            "RECSERVE_TRITON_URL": triton.grpc_url,
            "RECSERVE_LIMITS_MAX_IN_FLIGHT": "4096",
        }
        hot_users = bundle.user_ids[:200]
        with ExitStack() as app_stack:
            app = start_orchestrator(base_env, free_port(), ctx.work_dir / "service-hit.log")
            app_stack.callback(app.stop)
            prime_cache(app.url, hot_users)
            for concurrency in (1, 8, 32):
                run = asyncio.run(drive(app.url, hot_users, concurrency, seconds, debug=False))
                rows.append(_row("cache hit (200 warm users)", concurrency, run))
                if concurrency == 8:
                    measurements["service_rps_cache_hit_8_clients"] = Measured(round(run.rps, 1), "requests/s")
        miss_env = base_env | {"RECSERVE_ABLATION_CACHE_ENABLED": "false", "RECSERVE_DEADLINE_REQUEST_MS": "1000"}
        with ExitStack() as app_stack:
            app = start_orchestrator(miss_env, free_port(), ctx.work_dir / "service-miss.log")
            app_stack.callback(app.stop)
            for concurrency in (1, 4, 16):
                run = asyncio.run(drive(app.url, bundle.user_ids, concurrency, seconds, debug=True))
                rows.append(_row("cache miss, ranked on Triton (no cache)", concurrency, run))
                stages = [f"{median(run.stages_ms[s]):.2f}" if run.stages_ms[s] else "-" for s in STAGES]
                stage_rows.append([concurrency, *stages, f"{median(run.latencies_ms):.1f}"])
                if concurrency == 4:
                    measurements["service_rps_cache_miss_4_clients"] = Measured(round(run.rps, 1), "requests/s")
    load = os.getloadavg()[0]
    markdown = "\n".join(
        [
            "## Orchestrator over HTTP: cache hits and cache misses through Triton",
            "",
            ctx.provenance(),
            "",
            f"One orchestrator process (uvicorn, uvloop, 1 worker), a private redis-server, tritonserver on the cpu "
            f"profile (shipped batching), model `{bundle.model_version}`; a closed-loop httpx client on the same 2 "
            f"cores ({seconds:.0f} s per row; 1-minute load average {load:.2f} at the end). Cache-miss rows run "
            "with `RECSERVE_ABLATION_CACHE_ENABLED=false`, so every request retrieves, fetches features and ranks 200 "
            "candidates on Triton. Latency is what the client saw, HTTP included.",
            "",
            markdown_table(["traffic", "clients", "requests/s", "p50 ms", "p99 ms", "errors", "sources"], rows),
            "",
            "Per-stage breakdown of a cache miss (median ms per stage, from `debug=true` timings; the rest of the "
            "client latency is HTTP, JSON and queueing in the event loop):",
            "",
            markdown_table(["clients", *STAGES, "client p50 ms"], stage_rows),
            "",
            "The python client shares the cores with the service, Redis and Triton: for the highest sustainable "
            "throughput at p99 < 100 ms and the ratios against the naive design, see the load-test sections.",
        ]
    )
    return SectionResult(markdown, measurements)
