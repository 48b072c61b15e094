"""The load a user sees on a stack that already runs (``make up DATASET=NAME``): no stack of its own.

    python -m loadtest.running                                  # build/stack.env, mix90, steps of 10 s
    python -m loadtest.running --max-users 600 --warm 60        # higher steps; 60 s of warm-up load first
    python -m loadtest.running --stack-env /tmp/b/stack.env --out /tmp/b/loadtest

It reads build/stack.env (stack/env_file.py) for the API's address, the events API key and the settings the
orchestrator started with; draws users from the bundle of the model version the API serves (its /readyz);
then steps the load up with the driver's locust run (loadtest/driver.py ``run_locust``) until two steps in
a row miss p99 < 100 ms or fail 1% of requests. The cache is left as the stack holds it (nothing is
flushed or primed), so the first step's hit rate is the one the run found. The traffic writes to the
stack: mix90 and full send events (purchases invalidate the buyer's lists), as users would.

Writes results.json (every step, with hit rates and CPU per request) under --out, beside locust's CSV,
HTML report, log and steps.json (the per-step figures and the 1 s timeline of /metrics and CPU time);
prints a markdown summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from export.artifacts import artifacts_dir
from loadtest import procstat
from loadtest.driver import LOADTEST_DIR, RATE_PER_USER, SCENARIOS, RunOptions, log, run_locust
from loadtest.results import best_step
from stack import env_file
from stack.api_key import API_KEYS_VARIABLE, stack_api_key
from stack.errors import StackEnvError, StackError, StackNotRunning

OUT_DIR = LOADTEST_DIR / "running"
# Scenarios that run the shipped settings: the only ones a running stack can serve (the others switch
# RECSERVE_* ablations or a Triton without batching on, which a running orchestrator cannot change).
SCENARIO_CHOICES = ("mix90", "full", "cache_hit")
STEP_GROWTH = 1.25  # past the scenario's own steps, each step offers this much more than the last
VERSION_PLACEHOLDER = "{version}"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
SECRET_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
URL_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")  # redis://user:password@host


@dataclass(frozen=True)
class RunningStack:
    """What the load test needs from build/stack.env."""

    env_path: Path
    api_url: str
    redis_urls: tuple[str, ...]
    dataset: str
    model_version: str  # the one the stack started with; publish may have switched the API to another
    api_key: str
    triton_grpc_url: str
    orchestrator_pid: int | None
    settings: dict[str, str]  # RECSERVE_*, as the orchestrator started with them

    @classmethod
    def from_env(cls, values: Mapping[str, str], env_path: Path) -> RunningStack:
        for key in (env_file.API_URL, env_file.REDIS_URLS, API_KEYS_VARIABLE):
            if not values.get(key, "").strip():
                raise StackEnvError(env_path, None, f"{key} (written by `make up`)", "none")
        # The operator's keys when they set them, else the one `make up` made; the first one is used.
        api_key = stack_api_key(values).key
        pid = values.get("STACK_ORCHESTRATOR_PID", "")
        return cls(
            env_path=env_path,
            api_url=values[env_file.API_URL].rstrip("/"),
            redis_urls=tuple(u.strip() for u in values[env_file.REDIS_URLS].split(",") if u.strip()),
            dataset=values.get("STACK_DATASET", ""),
            model_version=values.get("STACK_MODEL_VERSION", ""),
            api_key=api_key,
            triton_grpc_url=values.get(env_file.TRITON_GRPC_URL, ""),
            orchestrator_pid=int(pid) if pid.isdigit() else None,
            settings={k: v for k, v in values.items() if k.startswith("RECSERVE_")},
        )

    @property
    def api_port(self) -> int | None:
        return urlsplit(self.api_url).port

    def public_settings(self) -> dict[str, str]:
        """The settings without secrets, for results.json."""
        return {key: redacted(key, value) for key, value in sorted(self.settings.items())}


def redacted(key: str, value: str) -> str:
    """``value`` unless it is a secret: settings named like one, and the password in a URL."""
    if any(marker in key.upper() for marker in SECRET_MARKERS):
        return "<redacted>"
    return URL_PASSWORD.sub(r"\1:<redacted>@", value)


def served_model_version(api_url: str, timeout_s: float = 5.0) -> str:
    """The model version the API serves now (its /readyz), which ``python -m export publish`` may have
    changed since the stack started."""
    try:
        with urllib.request.urlopen(f"{api_url}/readyz", timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StackNotRunning(Path(f"{api_url}/readyz"), f"HTTP {exc.code} (not ready)") from None
    except (OSError, ValueError) as exc:
        raise StackNotRunning(Path(f"{api_url}/readyz"), f"no answer ({exc})") from None
    return str(body.get("model_version", ""))


def find_bundle(stack: RunningStack, model_version: str) -> Path:
    """The bundle folder of ``model_version``: among the version folders the orchestrator's index path
    names (``…/artifacts/<dataset>/v{version}/item_index.faiss``, as ``make up`` sets it), else among
    ``artifacts/<dataset>/v*`` beside stack.env."""
    index_path = stack.settings.get("RECSERVE_INDEX_PATH", "")
    if index_path and VERSION_PLACEHOLDER not in index_path:
        return Path(index_path).parent  # one fixed bundle
    if index_path:
        template = Path(index_path).parent
        folder, pattern = template.parent, template.name.replace(VERSION_PLACEHOLDER, "*")
    else:
        if not stack.dataset:
            raise StackEnvError(stack.env_path, None, "RECSERVE_INDEX_PATH or STACK_DATASET", "neither")
        folder, pattern = artifacts_dir(stack.dataset, build_dir=stack.env_path.parent).parent, "v*"
    found: dict[str, Path] = {}
    for manifest in sorted(folder.glob(f"{pattern}/manifest.json")):
        found[str(json.loads(manifest.read_text()).get("model_version", ""))] = manifest.parent
    if model_version not in found:
        raise StackError(
            f"expected the bundle of model version {model_version!r} under {folder}, but found "
            f"{sorted(found) or 'no bundle'}: pass --bundle PATH"
        )
    return found[model_version]


def process_commands(proc: Path = procstat.PROC) -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process whose command line this user can read."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # redis-server rewrites its title into one argument ("redis-server 127.0.0.1:6380"): split both ways.
        argv = [word for part in raw.split(b"\0") for word in part.decode(errors="replace").split()]
        if argv:
            yield int(entry.name), argv


def is_redis_on(argv: Sequence[str], port: int) -> bool:
    if not Path(argv[0]).name.startswith("redis-server"):
        return False
    flagged = any(a == "--port" and b == str(port) for a, b in itertools.pairwise(argv))
    return flagged or any(word.endswith(f":{port}") for word in argv[1:])


def is_triton_on(argv: Sequence[str], grpc_port: int) -> bool:
    return Path(argv[0]).name == "tritonserver" and f"--grpc-port={grpc_port}" in argv


def is_orchestrator_on(argv: Sequence[str], port: int) -> bool:
    pairs = list(itertools.pairwise(argv))
    return ("-m", "orchestrator") in pairs and ("--port", str(port)) in pairs


def _local_port(url: str) -> int | None:
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    return parts.port if parts.hostname in LOCAL_HOSTS else None


def component_pids(stack: RunningStack, proc: Path = procstat.PROC) -> dict[str, int]:
    """The stack's processes on this machine whose CPU time to sample: the orchestrator (from stack.env,
    else by its port), each local redis-server and tritonserver (by the ports stack.env names). A part on
    another machine or in a container this user cannot see is left out."""
    commands = list(process_commands(proc))

    def first(match: Callable[[Sequence[str], int], bool], port: int | None) -> int | None:
        return next((pid for pid, argv in commands if port is not None and match(argv, port)), None)

    pids: dict[str, int] = {}
    orchestrator = stack.orchestrator_pid
    if orchestrator is None or not (proc / str(orchestrator)).exists():
        orchestrator = first(is_orchestrator_on, stack.api_port)
    if orchestrator is not None:
        pids["orchestrator"] = orchestrator
    for url in stack.redis_urls:
        port = _local_port(url)
        pid = first(is_redis_on, port)
        if pid is not None:
            pids["redis" if len(stack.redis_urls) == 1 else f"redis_{port}"] = pid
    triton = first(is_triton_on, _local_port(stack.triton_grpc_url)) if stack.triton_grpc_url else None
    if triton is not None:
        pids["triton"] = triton
    return pids


def load_steps(base: Sequence[int], max_users: int | None) -> tuple[int, ...]:
    """The scenario's user counts up to ``max_users``, continued past its last by ``STEP_GROWTH``."""
    if max_users is None:
        return tuple(base)
    steps = [users for users in base if users <= max_users]
    users = steps[-1] if steps else 0
    while users < max_users:
        users = min(max_users, max(users + 1, math.ceil(users * STEP_GROWTH / 10) * 10))
        steps.append(users)
    return tuple(steps)


def warm_step_count(warm_s: float, step_s: float) -> int:
    return math.ceil(warm_s / step_s) if warm_s > 0 else 0


def locust_env(
    stack: RunningStack, bundle: Path, steps: Sequence[int], warm_steps: int, stop_on: str
) -> dict[str, str]:
    """What the locustfile reads, set in full: the driver's defaults assume a stack of its own."""
    return {
        "LOADTEST_STEPS": ",".join(str(s) for s in steps),
        "LOADTEST_WARM_STEPS": str(warm_steps),
        "LOADTEST_FIXED_STEPS": str(warm_steps + 1),  # the first measured step always runs
        "LOADTEST_BUNDLE": str(bundle),
        "LOADTEST_API_KEY": stack.api_key,
        "LOADTEST_STOP_ON": stop_on,
        "LOADTEST_SCRAPE_METRICS": "1",
        # Never empty the cache of someone's running stack, whatever the calling shell has set.
        "LOADTEST_REDIS_URL": "",
        "LOADTEST_EMPTY_CACHE_AT": "",
    }


def answer_hit_rate(step: Mapping[str, Any]) -> float | None:
    """Share of personalised answers served from the cache, as the client saw them (their ``source``)."""
    sources: Mapping[str, int] = step.get("sources", {})
    total = sum(sources.values())
    return round(sources.get("cache", 0) / total, 4) if total else None


def metrics_hit_rate(timeline: Sequence[Mapping[str, Any]], step: int) -> float | None:
    """Cache hits over lookups during step ``step``, from the orchestrator's /metrics counters: from the
    last sample before the step to its last one."""
    scraped = [p for p in timeline if "misses" in p]
    during = [p for p in scraped if p["step"] == step]
    before = [p for p in scraped if p["step"] < step]
    if not during:
        return None
    start, end = (before[-1] if before else during[0]), during[-1]
    hits = (end["hits_local"] + end["hits_redis"]) - (start["hits_local"] + start["hits_redis"])
    lookups = hits + end["misses"] - start["misses"]
    return round(hits / lookups, 4) if lookups > 0 else None


def cpu_ms_per_request(step: Mapping[str, Any]) -> dict[str, float]:
    """CPU milliseconds per request of each sampled process, and of them all (``service``)."""
    requests = int(step.get("requests", 0))
    cpu_s: Mapping[str, float] = step.get("cpu_s", {})
    if not requests or not cpu_s:
        return {}
    figures = {name: round(1000.0 * s / requests, 3) for name, s in cpu_s.items()}
    figures["service"] = round(1000.0 * sum(cpu_s.values()) / requests, 3)
    return figures


def with_figures(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The locust run's steps, each with its hit rates and CPU per request."""
    timeline = run.get("timeline", [])
    return [
        {
            **step,
            "answer_hit_rate": answer_hit_rate(step),
            "metrics_hit_rate": metrics_hit_rate(timeline, int(step["step"])),
            "cpu_ms_per_request": cpu_ms_per_request(step),
        }
        for step in run["steps"]
    ]


def best_latency_step(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``best_step`` under p99 < 100 ms and < 1% failed alone (fallback answers allowed)."""
    return best_step([{**step, "slo_ok": step.get("latency_ok", False)} for step in steps])


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "n/a"


def _cpu(step: Mapping[str, Any], name: str) -> str:
    value = step.get("cpu_ms_per_request", {}).get(name)
    return f"{value:.2f}" if value is not None else "-"


def summary(results: Mapping[str, Any]) -> str:
    """The markdown printed at the end of a run (and testable from a results.json)."""
    steps: list[dict[str, Any]] = results["steps"]
    stack = results["stack"]
    components = [name for name in ("orchestrator", "redis", "triton") if name in results["pids"]]
    components += sorted(n for n in results["pids"] if n not in components)
    lines = [
        f"## Load on the running stack: {results['scenario']}",
        "",
        f"`{results['command']}`, {results['date']}; {results['machine']}.",
        f"Stack: {stack['api_url']}, data set {stack['dataset'] or 'n/a'}, model {stack['served_model_version']}; "
        f"users drawn from {results['bundle']} ({results['skew'] or 'n/a'}).",
        "",
        "| step | users | offered/s | achieved/s | p50 ms | p99 ms | failed | fallbacks | hit rate (answers) "
        "| hit rate (/metrics) | " + "".join(f"{name} CPU ms/req | " for name in components) + "locust cores |",
        "|" + "---|" * (11 + len(components)),
    ]
    for step in steps:
        verdict = "warm-up" if step.get("warmup") else ("ok" if step.get("latency_ok") else "missed")
        lines.append(
            f"| {step['step'] + 1} ({verdict}) | {step['users']} | {step['offered_rps']:g} | {step['achieved_rps']:g} "
            f"| {step.get('p50_ms', 0):g} | {step.get('p99_ms', 0):g} | {step['failure_share']:.1%} "
            f"| {step['fallback_share']:.1%} | {_pct(step.get('answer_hit_rate'))} "
            f"| {_pct(step.get('metrics_hit_rate'))} | "
            + "".join(f"{_cpu(step, name)} | " for name in components)
            + f"{step.get('load_generator_cores', 0.0):.2f} |"
        )
    lines.append("")
    best = results["best"]
    if best is None:
        lines.append("**No step met p99 < 100 ms with under 1% failed requests.**")
    else:
        lines.append(
            f"**Highest throughput at p99 < 100 ms: {best['achieved_rps']:g} req/s** (step {best['step'] + 1}, "
            f"{best['users']} users): p50 {best.get('p50_ms', 0):g} ms, p99 {best.get('p99_ms', 0):g} ms, "
            f"{best['failure_share']:.1%} failed, {best['fallback_share']:.1%} fallback answers, cache hit rate "
            f"{_pct(best.get('answer_hit_rate'))}."
        )
        per_request = best.get("cpu_ms_per_request", {})
        if per_request:
            parts = ", ".join(f"{name} {per_request[name] * 1000:.0f} µs" for name in components if name in per_request)
            per_core = 1000.0 / per_request["service"] if per_request["service"] > 0 else None
            lines.append(
                f"CPU per request there: {parts}; together {per_request['service'] * 1000:.0f} µs, "
                + (f"about {per_core:,.0f} requests per core-second of the stack." if per_core else "n/a.")
            )
        slo = results["best_slo"]
        if slo is None or slo["step"] != best["step"]:
            lines.append(
                "With under 1% fallback answers too (the service level of loadtest/results.py): "
                + (f"{slo['achieved_rps']:g} req/s (step {slo['step'] + 1})." if slo else "no step.")
            )
        if best.get("load_generator_cores", 0.0) >= 0.9:
            lines.append("Locust used a whole core at that step: the load generator, not the stack, may be the limit.")
    if steps:
        first = steps[0]
        lines.append(
            f"First step's hit rate (the cache as the run found it): {_pct(first.get('answer_hit_rate'))} of answers, "
            f"{_pct(first.get('metrics_hit_rate'))} of lookups."
        )
        measured_steps = [s for s in steps if not s.get("warmup")]
        if first.get("warmup") and measured_steps:
            lines.append(
                f"After {results['warm_s']:g} s of warm-up at {first['users']} users, the first measured step's: "
                f"{_pct(measured_steps[0].get('answer_hit_rate'))} of answers."
            )
    limited = write_limit_note(steps, results["stack"].get("settings", {}), results["out"])
    if limited:
        lines.append(limited)
    missing = [name for name in ("orchestrator", "redis", "triton") if name not in results["pids"]]
    if missing:
        lines.append(f"Not found on this machine, so no CPU figures: {', '.join(missing)}.")
    lines.append(f"Results: {results['out']}/results.json; locust's report: {results['out']}/report.html.")
    return "\n".join(lines)


def write_limit_note(steps: Sequence[Mapping[str, Any]], settings: Mapping[str, str], out: str) -> str | None:
    """Why event writes may have failed, when they did: every event of this run goes out with the stack's one
    API key, and the stack limits each key's writes (429 past it); such failures measure the limit, not the
    service."""
    failed = [(s["step"], s.get("failures", {}).get("event", 0)) for s in steps]
    failed = [(index, n) for index, n in failed if n]
    if not failed:
        return None
    rate = settings.get("RECSERVE_EVENTS_RATE_PER_S", "its default")
    burst = settings.get("RECSERVE_EVENTS_BURST", "its default")
    return (
        f"{sum(n for _, n in failed):,} event writes failed, from step {failed[0][0] + 1} on "
        f"({out}/locust_failures.csv has their status codes). This run sends every event with the stack's one API "
        f"key, whose writes the stack limits (RECSERVE_EVENTS_RATE_PER_S {rate}, RECSERVE_EVENTS_BURST {burst}; "
        "429 past them): where those are 429s, the step measured that limit, not the service; start the stack "
        "with both raised to load it past the limit."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.running", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack-env", type=Path, default=env_file.STACK_ENV_PATH, help="default build/stack.env")
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds per load step (default 10)")
    parser.add_argument(
        "--max-users", type=int, help=f"the last step's users ({RATE_PER_USER:g} req/s each); default the scenario's"
    )
    parser.add_argument("--scenario", choices=SCENARIO_CHOICES, default="mix90", help="traffic (loadtest/driver.py)")
    parser.add_argument("--warm", type=float, default=0.0, metavar="S", help="seconds of warm-up load before stepping")
    parser.add_argument("--warm-users", type=int, help="the warm-up's users (default: the first step's)")
    parser.add_argument(
        "--stop-on",
        choices=("latency", "slo"),
        default="latency",
        help="latency (default): stop after two steps in a row over p99 100 ms or 1%% failed; slo: also 1%% fallbacks",
    )
    parser.add_argument("--bundle", type=Path, help="the data bundle to draw users from (default: the served one's)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.step_s <= 0 or args.warm < 0:
        parser.error("--step-s must be > 0 and --warm >= 0")
    if (args.max_users is not None and args.max_users < 1) or (args.warm_users is not None and args.warm_users < 1):
        parser.error("--max-users and --warm-users must be integers >= 1")
    return args


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from bench.runner import Machine

    started = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    stack = RunningStack.from_env(env_file.running_stack_env(args.stack_env), args.stack_env)
    served = served_model_version(stack.api_url)
    bundle = args.bundle or find_bundle(stack, served)
    pids = component_pids(stack)
    scenario = SCENARIOS[args.scenario]
    steps = load_steps(scenario.steps, args.max_users)
    warm_steps = warm_step_count(args.warm, args.step_s)
    plan = (args.warm_users or steps[0],) * warm_steps + steps
    machine = Machine.detect()
    log(f"{stack.api_url} (model {served}); users from {bundle}; CPU of {pids or 'no process found'}")
    log(f"{scenario.name}: {len(plan)} steps of {args.step_s:g} s ({warm_steps} warm-up): users {list(plan)}")
    options = RunOptions(step_s=args.step_s, warmup_s=min(2.5, args.step_s / 4), out_dir=args.out)
    env = locust_env(stack, bundle, plan, warm_steps, args.stop_on)
    run_result = run_locust(scenario, stack.api_url, args.out, plan, options, pids, env)
    figures = with_figures(run_result)
    return {
        "command": command,
        "date": date,
        "machine": machine.describe(),
        "stack": {
            "env_file": str(args.stack_env),
            "api_url": stack.api_url,
            "dataset": stack.dataset,
            "started_model_version": stack.model_version,
            "served_model_version": served,
            "settings": stack.public_settings(),
        },
        "bundle": str(bundle),
        "skew": run_result.get("skew", ""),
        "scenario": scenario.name,
        "user_class": scenario.user_class,
        "rate_per_user": RATE_PER_USER,
        "step_s": options.step_s,
        "warmup_s": options.warmup_s,
        "warm_s": args.warm,
        "stop_on": args.stop_on,
        "pids": pids,
        "steps": figures,
        "best": best_latency_step(figures),
        "best_slo": best_step(figures),
        "out": str(args.out),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python -m loadtest.running", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    try:
        results = run(args, command)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(summary(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
