"""The side-by-side load run: one stack (Redis, two Tritons, the same data), then each scenario in turn:
its own orchestrator process (or the ceiling app), headless locust stepping the load up, results kept
under build/loadtest/<scenario>/.

Scenarios differ only in RECSERVE_* switches and in which Triton ranks (dynamic batching on, as shipped,
or off: no preferred sizes, 0 queue delay). Each one starts with an empty shared cache, so none inherits
the lists another computed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from export.artifacts import BUILD_DIR, Bundle, load_bundle
from loadtest.cachectl import flush_lists
from stack.launch import HttpService, start_http_service

LOADTEST_DIR = BUILD_DIR / "loadtest"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"

# Users of 10 requests/s each: offered load = 10 x users.
# One user first: a design that cannot hold the objective even then has no throughput at the objective.
COMPUTE_STEPS = (1, 2, 5, 10, 20, 30, 40, 60, 80, 100, 130)
# Finer near the top, where the scenarios that hit the cache reach the objective's limit on 2 cores.
HIT_STEPS = (10, 20, 40, 60, 80, 100, 130, 160, 180, 200, 230, 260, 300)
FIXED_USERS = 5  # the fixed load at which every scenario's p99 is compared: 50 requests/s
# A running service has a warm cache: scenarios with a cache first run this many steps at WARM_USERS
# (not measured), so that the hot keys are cached before the load steps up.
WARM_STEPS = 3
WARM_USERS = 3
RATE_PER_USER = 10.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    env: Mapping[str, str] = field(default_factory=dict)
    batching: bool = True  # which Triton ranks: dynamic batching on (shipped) or off
    user_class: str = "ShopperUser"
    steps: tuple[int, ...] = COMPUTE_STEPS
    ceiling: bool = False
    # The cache is primed with every user's home/web list before the load (a running service's state), so
    # that the figures measure hits rather than the first pass over 1000 users.
    prime_cache: bool = False
    # The most asked (user, page type, device) combinations to cache before the load (by Zipf weight times
    # the context's shares): a warm cache for traffic that draws a context per request.
    prime_contexts: int = 0
    # Orchestrator processes (uvicorn workers on one port). One Python process uses one core; "per_core"
    # runs one per core of this machine, as a node of one-core pods would (k8s/base/orchestrator).
    workers: int | Literal["per_core"] = 1

    @property
    def processes(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "per_core" else self.workers

    @property
    def cached(self) -> bool:
        return not self.ceiling and self.env.get("RECSERVE_ABLATION_CACHE_ENABLED", "true") != "false"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "naive",
            "the classic design run straight: no cache, no single-flight, one Redis GET per key, "
            "Triton with dynamic batching off",
            {
                "RECSERVE_ABLATION_CACHE_ENABLED": "false",
                "RECSERVE_ABLATION_SINGLE_FLIGHT_ENABLED": "false",
                "RECSERVE_ABLATION_STORE_READS": "one_by_one",
                "RECSERVE_ABLATION_REDIS_COALESCE": "false",
                # Nor a limit on computations at once (orchestrator/admission.py).
                "RECSERVE_ABLATION_ADMISSION_ENABLED": "false",
                # The classic design has no deadline fallback: let it compute every answer, so that its
                # latency is its own and not the fallback's.
                "RECSERVE_DEADLINE_REQUEST_MS": "2000",
                "RECSERVE_DEADLINE_FALLBACK_RESERVE_MS": "200",
            },
            batching=False,
        ),
        Scenario("full", "the system as shipped"),
        Scenario(
            "no_cache", "full, without any cache (every request computed)", {"RECSERVE_ABLATION_CACHE_ENABLED": "false"}
        ),
        Scenario("no_batching", "full, ranking on a Triton with dynamic batching off", batching=False),
        Scenario(
            "no_local_cache",
            "full, without the in-process cache layer",
            {"RECSERVE_ABLATION_LOCAL_CACHE_ENABLED": "false"},
        ),
        Scenario(
            "no_single_flight",
            "full, letting concurrent misses of one key all compute",
            {"RECSERVE_ABLATION_SINGLE_FLIGHT_ENABLED": "false"},
        ),
        Scenario(
            "mix90",
            "full, the reference design's mix: a page type and device per request, 8% of requests preceded by "
            "the user's purchase (invalidation, then a computed answer); the hit rate it reaches is measured",
            user_class="Mix90User",
            steps=HIT_STEPS,
            prime_cache=True,
        ),
        Scenario(
            "mix90_per_core",
            "mix90 served by one orchestrator worker per core of this machine, as one-core pods would serve it",
            user_class="Mix90User",
            steps=HIT_STEPS,
            prime_cache=True,
            workers="per_core",
        ),
        Scenario(
            "cache_hit",
            "full, one context per user: after the first pass every answer is a cache hit",
            user_class="CacheHitUser",
            steps=HIT_STEPS,
            prime_cache=True,
        ),
        Scenario(
            "no_hot_route",
            "cache_hit, with every recommendation GET routed through FastAPI's full request handling",
            {"RECSERVE_ABLATION_HOT_ROUTE_ENABLED": "false"},
            user_class="CacheHitUser",
            steps=HIT_STEPS,
            prime_cache=True,
        ),
        Scenario(
            "ceiling",
            "a one-route FastAPI app returning a fixed body, same server settings, same requests as cache_hit",
            user_class="CacheHitUser",
            steps=HIT_STEPS,
            ceiling=True,
        ),
    )
}
DEFAULT_ORDER = (
    "ceiling",
    "cache_hit",
    "no_hot_route",
    "naive",
    "full",
    "mix90",
    "mix90_per_core",
    "no_cache",
    "no_batching",
    "no_local_cache",
    "no_single_flight",
)
HEADLINE = ("naive", "full")


@dataclass
class Stack:
    bundle: Bundle
    redis_url: str
    redis_pid: int
    triton: dict[bool, Any]  # batching on/off -> TritonServer
    onnx_path: Path

    def ensure_triton(self, batching: bool) -> bool:
        """Restart the Triton that died (True if it had): a crash in one scenario must not turn the next
        one into a fallback benchmark."""
        server = self.triton[batching]
        if server.process is not None and server.process.poll() is None:
            return False
        log(
            f"Triton (batching {'on' if batching else 'off'}) had exited (code {server.process.returncode}): restarting"
        )
        server.start()  # appends to the same log, after a dated separator: the crash's lines stay
        return True


@dataclass
class RunOptions:
    step_s: float = 10.0
    warmup_s: float = 2.5
    out_dir: Path = LOADTEST_DIR
    quick: bool = False


def log(message: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def local_stack(dataset: str) -> Iterator[Stack]:
    """Redis, Triton with batching on (as shipped) and off, the bundle loaded and pre-computed."""
    from export.dataplane import default_onnx_model, load_and_precompute
    from export.model_repository import render_profile_repository
    from export.triton_config import BatchingSpec
    from stack.redis_local import start_server
    from stack.triton_launcher import TritonServer
    from stack.up import ensure_artifacts

    bundle = load_bundle(ensure_artifacts(dataset))
    onnx_path = default_onnx_model(bundle.manifest)
    with ExitStack() as stack:
        redis = start_server()
        stack.callback(redis.stop)
        log(f"redis-server at {redis.url}")
        tritons: dict[bool, Any] = {}
        specs = {True: BatchingSpec(), False: BatchingSpec(preferred_batch_sizes=(), max_queue_delay_microseconds=0)}
        for batching, spec in specs.items():
            label = "batching_on" if batching else "batching_off"
            repo = render_profile_repository(
                "cpu", LOADTEST_DIR / "triton" / label, embedding_dim=bundle.dim, batching=spec
            )
            server = TritonServer(repo, log_path=LOADTEST_DIR / "triton" / f"{label}.log").start()
            stack.callback(server.stop)
            tritons[batching] = server
            log(f"Triton ({label.replace('_', ' ')}) at {server.grpc_url}")
        log("loading the store and pre-computing every user's list")
        asyncio.run(load_and_precompute(redis.url, bundle, onnx_path, progress=False))
        yield Stack(bundle, redis.url, redis.process.pid, tritons, onnx_path)


def flush_cache(redis_url: str) -> int:
    """Drop every cached list so that each scenario starts cold (the benchmark's reset, never a request path)."""
    from redis import Redis

    client = Redis.from_url(redis_url)
    try:
        return flush_lists(client)
    finally:
        client.close()


def prime_contexts(base: str, bundle: Path, count: int, concurrency: int = 8, passes: int = 2) -> dict[str, int]:
    """Ask for the ``count`` most asked (user, page type, device) combinations, ``concurrency`` at a time;
    a further pass asks again for those answered by a fallback (never cached). Returns the sources."""
    import httpx

    from loadtest.traffic import Traffic, most_asked

    pending = most_asked(Traffic.from_bundle(bundle).users, count)
    sources: dict[str, int] = {}

    async def worker(
        client: httpx.AsyncClient, todo: list[tuple[str, str, str]], retry: list[tuple[str, str, str]]
    ) -> None:
        while todo:
            user, page_type, device = combo = todo.pop()
            response = await client.get(
                f"/v1/recommendations/{user}", params={"page_type": page_type, "device": device}
            )
            source = str(response.json().get("source")) if response.status_code == 200 else "error"
            sources[source] = sources.get(source, 0) + 1
            if source not in ("realtime", "cache"):
                retry.append(combo)

    async def run() -> None:
        todo = list(reversed(pending))  # pop() takes the most asked first
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            for _ in range(passes):
                retry: list[tuple[str, str, str]] = []
                await asyncio.gather(*(worker(client, todo, retry) for _ in range(concurrency)))
                todo = retry

    asyncio.run(run())
    return sources


def start_ceiling(port: int, log_path: Path, timeout_s: float = 30.0) -> HttpService:
    """The trivial FastAPI app, started and awaited exactly as the orchestrator is."""
    return start_http_service("loadtest.ceiling", {}, port, log_path, timeout_s)


# Writes need a key (docs/RELIABILITY.md): one per run, given to the orchestrators and to locust.
API_KEY = secrets.token_urlsafe(24)


def orchestrator_env(stack: Stack, scenario: Scenario) -> dict[str, str]:
    return {
        "RECSERVE_EVENTS_API_KEYS": f"loadtest:{API_KEY}",
        "RECSERVE_REDIS_URLS": stack.redis_url,
        "RECSERVE_INDEX_PATH": str(stack.bundle.path / "item_index.faiss"),
        "RECSERVE_ONNX_MODEL_PATH": str(stack.onnx_path),
        "RECSERVE_TRITON_URL": stack.triton[scenario.batching].grpc_url,
        # One locust process sends every event with one key: its limit would throttle the test.
        "RECSERVE_EVENTS_RATE_PER_S": "1000000",
        "RECSERVE_EVENTS_BURST": "1000000",
        **scenario.env,
    }


def run_locust(
    scenario: Scenario,
    url: str,
    folder: Path,
    steps: tuple[int, ...],
    options: RunOptions,
    cpu_pids: dict[str, int],
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Headless locust, one process (the machine has too few cores for --processes). ``extra_env`` goes to
    locust last (loadtest/goodput.py sets its own steps and cache-emptying with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    warm = (WARM_USERS,) * WARM_STEPS if scenario.cached else ()
    fixed_steps = len(warm) + (steps.index(FIXED_USERS) + 1 if FIXED_USERS in steps else 1)
    steps = warm + steps
    env = {
        **os.environ,
        "LOADTEST_STEPS": ",".join(str(s) for s in steps),
        "LOADTEST_API_KEY": API_KEY,
        "LOADTEST_STEP_S": str(options.step_s),
        "LOADTEST_WARMUP_S": str(options.warmup_s),
        "LOADTEST_FIXED_STEPS": str(fixed_steps),
        "LOADTEST_WARM_STEPS": str(len(warm)),
        "LOADTEST_RATE_PER_USER": str(RATE_PER_USER),
        "LOADTEST_OUT": str(folder / "steps.json"),
        "LOADTEST_CPU_PIDS": ",".join(f"{name}={pid}" for name, pid in cpu_pids.items()),
        # Each scrape of /metrics reaches one worker at random: counters from several do not make a series.
        "LOADTEST_SCRAPE_METRICS": "1" if scenario.processes == 1 else "0",
        **(extra_env or {}),
    }
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "--only-summary",
        "--host", url,
        "--csv", str(folder / "locust"),
        "--html", str(folder / "report.html"),
        "--json-file", str(folder / "locust"),
        "--loglevel", "WARNING",
        scenario.user_class,
    ]  # fmt: skip
    started = time.monotonic()
    with (folder / "locust.log").open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            if line.startswith("[loadtest]"):
                log(f"  {scenario.name}: {line.removeprefix('[loadtest] ').rstrip()}")
        process.wait()
    if process.returncode not in (0, 1):  # 1: some requests failed, which the figures report
        raise RuntimeError(f"locust exited with code {process.returncode}; see {folder / 'locust.log'}")
    result: dict[str, Any] = json.loads((folder / "steps.json").read_text())
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def run_scenario(
    stack: Stack, scenario: Scenario, label: str, options: RunOptions, locust_env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    from bench.service import prime_cache
    from stack.launch import free_port, start_orchestrator

    folder = options.out_dir / label
    steps = scenario.steps[:4] if options.quick else scenario.steps
    if not scenario.ceiling:
        stack.ensure_triton(scenario.batching)
    flushed = flush_cache(stack.redis_url)
    server: Any
    if scenario.ceiling:
        server = start_ceiling(free_port(), folder / "server.log")
        pids = {"server": server.process.pid}
    else:
        env = orchestrator_env(stack, scenario)
        server = start_orchestrator(env, free_port(), log_path=folder / "server.log", workers=scenario.processes)
        triton = stack.triton[scenario.batching]
        pids = {"server": server.process.pid, "redis": stack.redis_pid, "triton": triton.process.pid}
    log(f"{label}: {scenario.description} (flushed {flushed} cached lists)")
    try:
        if scenario.prime_cache:
            users = list(json.loads((stack.bundle.path / "users.json").read_text()))
            # A second pass catches the first pass's fallbacks (never cached).
            primed = prime_cache(server.url, users, passes=2, concurrency=4)
            log(f"{label}: priming the cache with {len(users)} users' lists: {primed}")
        if scenario.prime_contexts:
            primed = prime_contexts(server.url, stack.bundle.path, scenario.prime_contexts)
            log(f"{label}: priming the {scenario.prime_contexts} most asked contexts: {primed}")
        result = run_locust(scenario, server.url, folder, steps, options, pids, locust_env)
    finally:
        server.stop()
    crashed = not scenario.ceiling and stack.triton[scenario.batching].process.poll() is not None
    if crashed:
        log(f"{label}: Triton CRASHED during this scenario (see {stack.triton[scenario.batching].log_path})")
    result["triton_crashed"] = crashed
    return {
        "scenario": scenario.name,
        "label": label,
        "description": scenario.description,
        "workers": 1 if scenario.ceiling else scenario.processes,
        **result,
    }
