"""The figures of a load run, as ratios: docs/BENCHMARKS.md sections ``loadtest`` and ``ablations``,
docs/img/loadtest_*.png and the orchestrator keys of docs/measurements.json (through ``bench.runner``,
the one writer of those files)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.runner import (
    BENCHMARKS_PATH,
    IMAGES_DIR,
    MEASUREMENTS_PATH,
    Measured,
    format_rate,
    markdown_table,
    replace_section,
    update_measurements,
)
from loadtest.driver import FIXED_USERS, RATE_PER_USER, SCENARIOS
from loadtest.plots import first_runs, requests_per_cpu_s
from loadtest.results import MAX_FAILURE_SHARE, MAX_FALLBACK_SHARE, SLO_P99_MS, best_step, measured, step_at

REFERENCE_RPS_PER_CORE = 50_000 / (20 * 8)  # the reference design: 50K QPS on 20 servers x 8 cores
FIXED_RPS = FIXED_USERS * RATE_PER_USER


def _by_label(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["label"]: run for run in results["runs"]}


def efficiency(run: dict[str, Any], component: str = "server", max_fallback: float = 1.0) -> float | None:
    """Requests per CPU-second of ``component`` at the step where it was highest (fixed costs such as
    the /metrics scrape weigh least at high load), among steps with at most ``max_fallback`` fallbacks."""
    rates = [
        r
        for s in measured(run["steps"])
        if s["fallback_share"] <= max_fallback
        for r in [requests_per_cpu_s(s, component)]
        if r is not None
    ]
    return max(rates) if rates else None


def summary_of(run: dict[str, Any]) -> dict[str, Any]:
    best = best_step(run["steps"])
    fixed = step_at(run["steps"], FIXED_RPS)
    computed = [
        s for s in measured(run["steps"]) if s["fallback_share"] < MAX_FALLBACK_SHARE and s["failure_share"] < 0.01
    ]
    personalised = sum(best["sources"].values()) if best else 0
    return {
        "max_rps_slo": float(best["achieved_rps"]) if best else 0.0,
        "best": best,
        "p99_fixed_ms": fixed.get("p99_ms") if fixed else None,
        "fixed": fixed,
        "max_rps_computed": max((float(s["achieved_rps"]) for s in computed), default=0.0),
        "server_rps_per_cpu_s": efficiency(run),
        "hit_share_best": best["sources"].get("cache", 0) / personalised if best and personalised else None,
        "steps_run": len(run["steps"]),
        # Orchestrator processes; runs recorded before the field existed ran what their scenario declares.
        "workers": int(
            run.get("workers", SCENARIOS[run["scenario"]].processes if run.get("scenario") in SCENARIOS else 1)
        ),
        # A step past the best that missed: the best is the limit, not the end of the step plan.
        "saturated": best is not None
        and any(st["users"] > best["users"] and not st["slo_ok"] for st in measured(run["steps"])),
        "next_step": next((st for st in measured(run["steps"]) if best and st["users"] > best["users"]), None),
    }


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "n/a"


def _rate(value: float | None) -> str:
    return format_rate(value) if value else "none"


def _spread(a: float | None, b: float | None) -> str:
    if a is None or b is None or (a + b) <= 0:
        return "n/a"
    return f"{abs(a - b) / ((a + b) / 2):.0%}"


def _provenance(results: dict[str, Any]) -> str:
    machine = results["machine"]
    return (
        f"Command: `{results['command']}` · date: {results['date']} · machine: {machine['cores']} cores "
        f"({machine['cpu_model']}) · whole run {results['wall_s'] / 60:.1f} min"
    )


def loadtest_markdown(results: dict[str, Any], images: list[str], plan_text: str) -> str:
    runs = _by_label(results)
    s = {label: summary_of(run) for label, run in runs.items()}
    naive, full = s.get("naive"), s.get("full")
    skew = next((run.get("skew") for run in results["runs"] if run.get("skew")), "")
    lines = [
        "## Load test: the full system against the naive design (locust)",
        "",
        _provenance(results),
        "",
        "**CPU figures are not GPU figures**, and here the whole stack (orchestrator, Redis, Triton on the cpu "
        "profile) and the load generator (one locust process) share the same 2 cores, with other work on the "
        "machine: wall-clock throughput is capped by locust and by neighbours, not only by the service. "
        "Requests per server CPU-second (from /proc, locust excluded) is the figure that carries over to a pod.",
        "",
        f"Traffic (`loadtest/locustfile.py`, `ShopperUser`): users drawn by {skew}; 80% personalised lists "
        "(page type home 40 / product 30 / category 15 / search 10 / cart 5, device web 45 / ios 25 / android 25 / "
        "tv 5), 10% anonymous segment lists, 10% events (view 60 / click 25 / add_to_cart 10 / purchase 5; a "
        "purchase invalidates the user's cached lists). Step load: each locust user offers 10 requests/s; "
        f"{results['step_s']:g} s per step, the first {results['warmup_s']:g} s of each not measured; the "
        "cache is emptied before each scenario. A step meets the service level when p99 over all its requests "
        "< 100 ms with < 1% failures and < 1% fallback answers (pre-computed/popular).",
        "",
    ]
    if naive and full:
        naive_best = naive["max_rps_slo"]
        lines += [
            "### Headline",
            "",
            markdown_table(
                ["", "naive", "full", "full / naive"],
                [
                    [
                        "highest throughput at p99 < 100 ms",
                        f"{_rate(naive_best)} req/s",
                        f"{_rate(full['max_rps_slo'])} req/s",
                        _ratio(full["max_rps_slo"], naive_best) if naive_best else "naive meets it at no load",
                    ],
                    [
                        f"p99 at a fixed {FIXED_RPS:g} req/s",
                        _ms(naive["p99_fixed_ms"]),
                        _ms(full["p99_fixed_ms"]),
                        _ratio(naive["p99_fixed_ms"], full["p99_fixed_ms"]) + " lower",
                    ],
                    [
                        "highest throughput with every answer computed (any p99)",
                        f"{_rate(naive['max_rps_computed'])} req/s",
                        f"{_rate(full['max_rps_computed'])} req/s",
                        _ratio(full["max_rps_computed"], naive["max_rps_computed"]),
                    ],
                    [
                        "requests per server CPU-second (best step)",
                        _rate(naive["server_rps_per_cpu_s"]),
                        _rate(full["server_rps_per_cpu_s"]),
                        _ratio(full["server_rps_per_cpu_s"], naive["server_rps_per_cpu_s"]),
                    ],
                ],
            ),
            "",
        ]
        lines += headline_notes(naive, full)
    lines += collapse_lines(results)
    lines += overload_lines(results)
    lines += crash_lines(results)
    lines += ceiling_lines(results, s)
    lines += reference_mix_lines(results, s)
    lines += reproducibility_lines(s)
    lines += [
        "### Plots",
        "",
        *[f"![{Path(p).stem}](img/{Path(p).name})" for p in images],
        "",
        "### Extrapolation to 100M users at 50K QPS",
        "",
        "`python -m export capacity` with the per-core figures measured here (docs/measurements.json: "
        "`orchestrator_rps_per_core_cache_hit` from `cache_hit`, `orchestrator_rps_per_core_cache_miss` and "
        "`orchestrator_p99_ms_cache_miss` from `no_cache`), 90% cache hits, 60% CPU target:",
        "",
        "```",
        plan_text,
        "```",
        "",
        "Per-core figures are per server CPU-second on this machine's cores; a pod with a dedicated core and "
        "its Redis/Triton elsewhere does about that many requests per core, so the orchestrator line scales "
        "linearly. The Triton line rests on a T4 speed-up that no one measured here (marked provisional).",
        "",
        "Every run's raw figures: `build/loadtest/results.json`; per scenario locust's HTML report, CSVs and "
        "per-step JSON under `build/loadtest/<scenario>/`.",
    ]
    return "\n".join(lines)


def headline_notes(naive: dict[str, Any], full: dict[str, Any]) -> list[str]:
    lines = []
    if naive["max_rps_slo"] > 0 and full["max_rps_slo"] > 0:
        ratio = full["max_rps_slo"] / naive["max_rps_slo"]
        verdict = "meets" if ratio >= 5 else "does not meet"
        lines.append(f"**Full / naive at p99 < 100 ms: {ratio:.1f}x**, which {verdict} the 5x target.")
    elif naive["max_rps_slo"] == 0:
        fixed = naive["fixed"]
        lines.append(
            "**The naive design meets p99 < 100 ms at no load level on this machine** (p99 "
            f"{_ms(fixed.get('p99_ms') if fixed else None)} already at {FIXED_RPS:g} req/s): one Redis GET per key "
            "is ~400 sequential round trips per request (200 candidates x embedding + features), so one request "
            "alone costs most of the budget; the ratio of highest throughputs at the objective is unbounded. The "
            "finite comparisons are the rows below it: throughput with every answer computed and requests per "
            "server CPU-second."
        )
    if full["max_rps_slo"] == 0:
        lines.append("**The full system met the objective at no step in this run**: see the steps table below.")
    return [*lines, ""]


def crash_lines(results: dict[str, Any]) -> list[str]:
    crashed = [run["label"] for run in results["runs"] if run.get("triton_crashed")]
    if not crashed:
        return []
    return [
        "### Triton crashed under overload",
        "",
        f"tritonserver (2.51, cpu profile) died with SIGSEGV during: {', '.join(f'`{c}`' for c in crashed)}; "
        "the driver restarts it before the next scenario, so only the overloaded steps of those runs are "
        "affected (answers there are fallbacks). The backtrace (`pthread_mutex_lock` in the gRPC handler) "
        "matches the known race between a client cancelling an inference (our per-call deadline) and its "
        "completion, triton-inference-server/server#8034 and #7368, fixed by server PR #7840 (r24.12), after "
        "the 2.51 binary the `nvidia-pytriton` wheel ships.",
        "",
    ]


def collapse_lines(results: dict[str, Any]) -> list[str]:
    """The step after the best one: when most answers there were fallbacks and each request cost the
    server several times more CPU, the service did not level off but collapsed."""
    found = []
    for run in first_runs(results):
        steps = measured(run["steps"])
        best = best_step(steps)
        if best is None or best is steps[-1]:
            continue
        after = steps[steps.index(best) + 1]
        before_cost, after_cost = requests_per_cpu_s(best), requests_per_cpu_s(after)
        if after["fallback_share"] > 0.5 and before_cost and after_cost and after_cost < 0.7 * before_cost:
            found.append(
                f"`{run['scenario']}` {best['achieved_rps']:g} -> {after['achieved_rps']:g} req/s with "
                f"{after['fallback_share']:.0%} fallbacks, {1000 / before_cost:.1f} -> {1000 / after_cost:.1f} ms "
                "of server CPU per request"
            )
    if not found:
        return []
    return [
        "### Past saturation: congestion collapse",
        "",
        "One step past the best, most answers became fallbacks and each request cost the server several times "
        "the CPU: " + "; ".join(found) + ". What the service does past saturation (docs/RELIABILITY.md, "
        "Overload): while the event loop runs late (`RECSERVE_OVERLOAD_LOOP_LAG_MS`) or the cache lookup ate "
        "the budget (`RECSERVE_DEADLINE_MIN_COMPUTE_MS`), a cache miss answers from the pre-computed list at once "
        "(`fallback_reason: overload`) and that answer is held for the user (`RECSERVE_OVERLOAD_HOLD_S`); a "
        "computation stops at its own deadline; Redis reads and Triton calls past their deadline finish "
        "rather than being cancelled (no reconnects; the breaker opens only on Triton's own errors). Answers "
        "past saturation are fallbacks, not errors, but a fallback still costs Redis round trips, more than "
        "the local hit it replaced, so a load the cache cannot absorb (every request a different list) stays "
        "past saturation.",
        "",
    ]


def overload_lines(results: dict[str, Any], scenario: str = "mix90") -> list[str]:
    """The steps past the reference mix's best one: did the service shed load, or collapse?"""
    run = next((r for r in first_runs(results) if r["scenario"] == scenario), None)
    if run is None:
        return []
    steps = measured(run["steps"])
    best = best_step(steps)
    if best is None or best is steps[-1]:
        return []
    past = steps[steps.index(best) + 1 :]
    rows = [
        [
            f"{step['users']}",
            f"{step['achieved_rps']:,.0f}",
            _ms(step["p99_ms"]),
            f"{step['fallback_share']:.1%}",
            f"{step['failure_share']:.1%}",
            f"{1e6 / cost:,.0f} µs" if (cost := requests_per_cpu_s(step)) else "n/a",
        ]
        for step in [best, *past]
    ]
    missed = sorted(
        {
            reason
            for step in past
            for reason, failed in (
                ("p99", step["p99_ms"] is None or step["p99_ms"] >= SLO_P99_MS),
                ("failures", step["failure_share"] >= MAX_FAILURE_SHARE),
                ("fallbacks", step["fallback_share"] >= MAX_FALLBACK_SHARE),
            )
            if failed
        }
    )
    costs = [c for c in (requests_per_cpu_s(step) for step in past) if c]
    best_cost = requests_per_cpu_s(best)
    cost_ratio = best_cost / min(costs) if costs and best_cost else None
    lowest = min(step["achieved_rps"] for step in past)
    # Collapse: the work per answer grows or the answers per second fall as the load rises (the section above
    # names a collapse only where, besides, most answers were fallbacks). Shedding: throughput holds at the
    # same cost, and what cannot be computed in time is answered from the fallbacks.
    if (cost_ratio is not None and cost_ratio > 1.4) or lowest < 0.9 * best["achieved_rps"]:
        verdict = "collapsed: past the best step, throughput fell or each answer cost the server more CPU"
    else:
        verdict = (
            f"shed load rather than collapsing: past the best step throughput held ({lowest:,.0f} req/s or "
            f"more, against {best['achieved_rps']:,.0f} at the best)"
            + (f" at the same CPU per request (at most {cost_ratio:.2f}x the best step's)" if cost_ratio else "")
            + f", and what the process could not compute in time it answered from the fallbacks (up to "
            f"{max(step['fallback_share'] for step in past):.0%} of answers); what those steps missed: "
            f"{', '.join(missed) or 'nothing'}. When and why answers fell back, second by second: "
            "loadtest_overload.png"
        )
    return [
        f"### Past the best step ({scenario})",
        "",
        f"The first row is the best step that met the objective; the rest were run past it. The service {verdict}.",
        "",
        markdown_table(["users", "achieved req/s", "p99", "fallbacks", "failures", "server CPU per request"], rows),
        "",
    ]


def ceiling_lines(results: dict[str, Any], s: dict[str, dict[str, Any]]) -> list[str]:
    hit, ceiling = s.get("cache_hit"), s.get("ceiling")
    if not hit or not ceiling:
        return []
    per_cpu = (
        hit["server_rps_per_cpu_s"] / ceiling["server_rps_per_cpu_s"]
        if hit["server_rps_per_cpu_s"] and ceiling["server_rps_per_cpu_s"]
        else None
    )
    wall = hit["max_rps_slo"] / ceiling["max_rps_slo"] if ceiling["max_rps_slo"] else None
    verdict = "meets" if per_cpu is not None and per_cpu >= 0.6 else "does not meet"
    ceiling_run = next((r for r in first_runs(results) if r["scenario"] == "ceiling"), None)
    ceiling_steps = measured(ceiling_run["steps"]) if ceiling_run else []
    unbounded = bool(ceiling_steps) and all(step["slo_ok"] for step in ceiling_steps)
    hit_run = next((r for r in first_runs(results) if r["scenario"] == "cache_hit"), None)
    same_load = ""
    if hit_run and ceiling_run:
        # Per-request CPU falls with load (fixed costs spread thinner): also compare at one offered load.
        ceiling_by_load = {float(step["offered_rps"]): step for step in ceiling_steps if step["slo_ok"]}
        shared = [
            step
            for step in measured(hit_run["steps"])
            if step["slo_ok"] and float(step["offered_rps"]) in ceiling_by_load
        ]
        if shared:
            step = max(shared, key=lambda item: float(item["offered_rps"]))
            mine = requests_per_cpu_s(step)
            theirs = requests_per_cpu_s(ceiling_by_load[float(step["offered_rps"])])
            if mine and theirs:
                same_load = (
                    f" At the same offered load ({step['offered_rps']:g} req/s, the highest both met the objective "
                    f"at): {_rate(mine)} against {_rate(theirs)} requests per server CPU-second, {mine / theirs:.0%}."
                )
    no_hot_route = ""
    if s.get("no_hot_route") and ceiling["server_rps_per_cpu_s"]:
        plain = s["no_hot_route"]["server_rps_per_cpu_s"]
        no_hot_route = (
            f" Routed through FastAPI instead (`no_hot_route`, the same hits): {_rate(plain)} requests per "
            f"server CPU-second, {plain / ceiling['server_rps_per_cpu_s']:.0%} of the ceiling."
        )
    layers = ""
    if hit_run and hit_run["timeline"] and "hits_local" in hit_run["timeline"][-1]:
        last = hit_run["timeline"][-1]
        hits = last["hits_local"] + last["hits_redis"]
        if hits:
            layers = (
                f" Of its cache hits, {last['hits_local'] / hits:.0%} came from the in-process layer and "
                f"{last['hits_redis'] / hits:.0%} from Redis."
            )
    return [
        "### The cache-hit path against the framework's ceiling",
        "",
        "`ceiling`: `loadtest/ceiling.py`, one FastAPI route returning a fixed body of the same size, served "
        "as the orchestrator is (uvicorn, uvloop, httptools, 1 worker, no access log); `cache_hit`: the full "
        "system with one context per user, so that after the first pass every answer comes from the cache; "
        "both driven by the same locust user class and URLs.",
        "",
        markdown_table(
            ["", "cache_hit", "ceiling", "fraction of the ceiling"],
            [
                [
                    "requests per server CPU-second (best step)",
                    _rate(hit["server_rps_per_cpu_s"]),
                    _rate(ceiling["server_rps_per_cpu_s"]),
                    f"{per_cpu:.0%}" if per_cpu is not None else "n/a",
                ],
                [
                    "highest throughput at p99 < 100 ms (wall clock)",
                    f"{_rate(hit['max_rps_slo'])} req/s",
                    f"{_rate(ceiling['max_rps_slo'])} req/s",
                    f"{wall:.0%}" if wall is not None else "n/a",
                ],
            ],
        ),
        "",
        f"**Per server CPU-second the cache-hit path reaches "
        f"{f'{per_cpu:.0%}' if per_cpu is not None else 'n/a'} of the ceiling**, which {verdict} the 60% target. "
        "Well-formed recommendation GETs are answered by the hot route (orchestrator/hot_route.py), below "
        "FastAPI's routing, parameter validation and response classes, which the ceiling's one route still "
        "pays; what a hit adds: parse and validate four parameters, check that the invalidation feed is "
        "alive, look up the in-process TTL-LRU (else one pipelined Redis round trip), build the item list, "
        "the per-stage timer and two Prometheus observations." + same_load + layers + no_hot_route,
        "",
        (
            "The ceiling met the objective at every step up to the highest load offered, so its wall-clock "
            "figure is a lower bound set by the step plan and the one locust process, and the wall-clock "
            "fraction an upper bound."
            if unbounded
            else "The wall-clock row shares the 2 cores with locust and the rest of the stack: the per-CPU row "
            "is the one to use."
        ),
        "",
    ]


def reference_mix_lines(results: dict[str, Any], s: dict[str, dict[str, Any]]) -> list[str]:
    names = [n for n in ("mix90", "mix90_per_core") if s.get(n) and s[n]["best"]] or (
        ["full"] if s.get("full") and s["full"]["best"] else []
    )
    if not names:
        return []
    cores = results["machine"]["cores"]
    target = 3 * REFERENCE_RPS_PER_CORE
    lines = ["### The reference design's traffic mix on this machine", ""]
    per_core_by_name: dict[str, float] = {}
    for name in names:
        best = s[name]["best"]
        per_core = per_core_by_name[name] = float(best["achieved_rps"]) / cores
        hit = s[name]["hit_share_best"]
        server = requests_per_cpu_s(best)
        stack_cpu = sum(float(v) for v in best.get("cpu_s", {}).values())
        stack_per_core = best["requests"] / stack_cpu if stack_cpu > 0 else None
        locust_cpu = best.get("load_generator_cpu_s")
        locust_rows = (
            [["load generator (locust) CPU only", _rate(best["requests"] / locust_cpu), "(not a service figure)"]]
            if locust_cpu
            else []
        )
        lines += [
            f"Scenario `{name}` ({SCENARIOS[name].description}). At its best step ({best['users']} users, "
            f"offered {best['offered_rps']:g} req/s, achieved {best['achieved_rps']:g} req/s)"
            + (
                f", {hit:.0%} of personalised answers came from the cache (the reference design assumes 90%)."
                if hit is not None
                else "."
            ),
            "",
            markdown_table(
                ["per core", "req/s", "against the reference's 312 req/s per core"],
                [
                    [
                        f"whole machine ({cores} cores: stack + locust)",
                        _rate(per_core),
                        f"{per_core / REFERENCE_RPS_PER_CORE:.2f}x",
                    ],
                    [
                        "stack CPU only (orchestrator + Redis + Triton CPU-seconds)",
                        _rate(stack_per_core),
                        _ratio(stack_per_core, REFERENCE_RPS_PER_CORE),
                    ],
                    ["orchestrator CPU only", _rate(server), _ratio(server, REFERENCE_RPS_PER_CORE)],
                    *locust_rows,
                ],
            ),
            "",
            *cores_needed_lines(
                best, stack_cpu, locust_cpu, cores, target, s[name]["next_step"], s[name]["workers"] == 1
            ),
        ]
    best_name = max(per_core_by_name, key=lambda n: per_core_by_name[n])
    verdict = "meets" if per_core_by_name[best_name] >= target else "does not meet"
    lines += [
        "Requests counted: every answered request locust sent at that step, the purchase events that "
        "precede a share of the recommendation calls included (each one is an invalidation the service "
        "serves). "
        f"The best whole-machine figure ({_rate(per_core_by_name[best_name])} req/s per core, `{best_name}`) "
        f"{verdict} the target of 3x (936 req/s per core)."
        + (
            " The stack-CPU rows say what the service itself costs, wherever the load comes from."
            if verdict != "meets"
            else ""
        ),
        "",
    ]
    return lines


def cores_needed_lines(
    best: dict[str, Any],
    stack_cpu: float,
    locust_cpu: float | None,
    cores: int,
    target_per_core: float,
    next_step: dict[str, Any] | None,
    one_worker: bool = False,
) -> list[str]:
    """What the target rate would take of this machine at the CPU per request measured at the best step."""
    requests = float(best.get("requests", 0))
    if not locust_cpu or requests <= 0 or stack_cpu <= 0:
        return []
    stack_us, locust_us = stack_cpu / requests * 1e6, locust_cpu / requests * 1e6
    target_rps = target_per_core * cores
    needed = target_rps * (stack_us + locust_us) / 1e6

    def busy(step: dict[str, Any]) -> float:
        return (sum(step.get("cpu_cores", {}).values()) + float(step.get("load_generator_cores", 0.0))) / cores

    if next_step is None:
        after = " (the highest step offered)."
    else:
        server_cores = float(next_step.get("cpu_cores", {}).get("server", 0.0))
        process_bound = one_worker and server_cores >= 0.95
        after = (
            f"; at the next step ({next_step['users']} users), which did not hold the objective, the orchestrator "
            f"used {server_cores:.2f} cores and the machine was {busy(next_step):.0%} busy"
            + (
                ": one orchestrator process uses one core at most, so the process, not the machine, was the limit."
                if process_bound
                else "."
            )
        )
    return [
        f"CPU per request at that step: the stack {stack_us:,.0f} µs (orchestrator, Redis, Triton), locust "
        f"{locust_us:,.0f} µs. At the target ({target_per_core:,.0f} req/s per core, {target_rps:,.0f} req/s on "
        f"these {cores} cores) that is **{needed:.2f} cores of CPU work, {needed / cores:.0%} of the machine**; "
        f"at this best step the stack and locust kept it {busy(best):.0%} busy" + after,
        "",
    ]


def reproducibility_lines(s: dict[str, dict[str, Any]]) -> list[str]:
    pairs = [(name, s.get(name), s.get(f"{name}_run2")) for name in ("naive", "full")]
    rows = []
    for name, first, second in pairs:
        if not first or not second:
            continue
        rows += [
            [
                f"{name}: highest throughput at p99 < 100 ms",
                _rate(first["max_rps_slo"]),
                _rate(second["max_rps_slo"]),
                _spread(first["max_rps_slo"], second["max_rps_slo"]),
            ],
            [
                f"{name}: p99 at {FIXED_RPS:g} req/s",
                _ms(first["p99_fixed_ms"]),
                _ms(second["p99_fixed_ms"]),
                _spread(first["p99_fixed_ms"], second["p99_fixed_ms"]),
            ],
            [
                f"{name}: requests per server CPU-second",
                _rate(first["server_rps_per_cpu_s"]),
                _rate(second["server_rps_per_cpu_s"]),
                _spread(first["server_rps_per_cpu_s"], second["server_rps_per_cpu_s"]),
            ],
        ]
    if not rows:
        return []
    return [
        "### Reproducibility",
        "",
        "The headline pair ran a second time at the end of the same command (same stack, cache emptied "
        "first). Spread = |run 1 - run 2| / mean.",
        "",
        markdown_table(["figure", "run 1", "run 2", "spread"], rows),
        "",
        "Treat differences smaller than the largest spread above as noise: the machine is shared, and a "
        "step load moves in steps of 50-200 req/s, so the highest passing step can move by one step.",
        "",
    ]


def ablations_markdown(results: dict[str, Any]) -> str:
    summaries = {run["label"]: summary_of(run) for run in first_runs(results)}
    full = summaries.get("full")
    rows = []
    for label, summary in summaries.items():
        best = summary["best"]
        rows.append(
            [
                f"`{label}`",
                SCENARIOS[label].description,
                f"{_rate(summary['max_rps_slo'])}",
                _ratio(summary["max_rps_slo"], full["max_rps_slo"]) if full else "n/a",
                _ms(summary["p99_fixed_ms"]),
                _rate(summary["server_rps_per_cpu_s"]),
                f"{summary['hit_share_best']:.0%}" if summary["hit_share_best"] is not None else "-",
                f"{best['fallback_share']:.1%}" if best else "-",
            ]
        )
    step_rows = []
    for run in results["runs"]:
        for step in measured(run["steps"]):
            cores = step.get("cpu_cores", {})
            step_rows.append(
                [
                    run["label"],
                    step["users"],
                    f"{step['offered_rps']:g}",
                    f"{step['achieved_rps']:g}",
                    _ms(step.get("p50_ms")),
                    _ms(step.get("p99_ms")),
                    f"{step['fallback_share']:.1%}",
                    f"{step['failure_share']:.1%}",
                    " / ".join(f"{cores.get(c, 0):.2f}" for c in ("server", "redis", "triton")),
                    "yes" if step["slo_ok"] else "no",
                ]
            )
    return "\n".join(
        [
            "## Ablations: one piece of the design off at a time",
            "",
            _provenance(results),
            "",
            "Same stack, same data, same run as the load-test section; each scenario is the full system with one "
            "switch flipped (`RECSERVE_*`, orchestrator/config.py) or ranking on a second Triton with dynamic "
            "batching off (no preferred sizes, `max_queue_delay` 0). Ratios are to `full` from the same run.",
            "",
            markdown_table(
                [
                    "scenario",
                    "what it is",
                    "req/s at p99 < 100 ms",
                    "/ full",
                    f"p99 at {FIXED_RPS:g} req/s",
                    "req per server CPU-s",
                    "from cache (best step)",
                    "fallbacks (best step)",
                ],
                rows,
                align="llrrrrrr",
            ),
            "",
            "Dynamic batching on Triton in isolation (concurrency 1..64, `max_queue_delay` 0/1/5/10 ms) is the "
            "`batching` section (`bench/batching.py`): on the CPU it gains little, which is why "
            "`no_batching` is close to `full` here.",
            "",
            "<details><summary>Every step of every run</summary>",
            "",
            markdown_table(
                [
                    "run",
                    "users",
                    "offered",
                    "achieved",
                    "p50",
                    "p99",
                    "fallbacks",
                    "failures",
                    "cores: server / redis / triton",
                    "meets SLO",
                ],
                step_rows,
                align="lrrrrrrrrl",
            ),
            "",
            "</details>",
        ]
    )


def measurements(results: dict[str, Any]) -> dict[str, Measured]:
    found: dict[str, Measured] = {}
    runs = {run["label"]: run for run in first_runs(results)}
    if "cache_hit" in runs and (value := efficiency(runs["cache_hit"], max_fallback=MAX_FALLBACK_SHARE)):
        found["orchestrator_rps_per_core_cache_hit"] = Measured(
            round(value), "requests per CPU-second of the orchestrator process (1 uvicorn worker), all cache hits"
        )
    if "no_cache" in runs:
        run = runs["no_cache"]
        if value := efficiency(run, max_fallback=0.05):
            found["orchestrator_rps_per_core_cache_miss"] = Measured(
                round(value),
                "requests per CPU-second of the orchestrator process, every request computed (FAISS + Redis + "
                "Triton call; Triton's and Redis's CPU not included)",
            )
        summary = summary_of(run)
        step = summary["best"] or summary["fixed"]
        if step and "p99_ms" in step:
            found["orchestrator_p99_ms_cache_miss"] = Measured(
                float(step["p99_ms"]),
                f"ms p99 of the cache-miss path at {step['achieved_rps']:g} req/s (no_cache scenario, whole stack "
                "and load generator on 2 cores, Triton cpu profile)",
            )
    return found


def capacity_text() -> str:
    from export.capacity import CapacityInputError, Load, format_plan, load_measurements, plan

    load = Load(users=100_000_000, qps=50_000, p99_ms=100, cache_hit_rate=0.9)
    try:
        return format_plan(plan(load, load_measurements()))
    except CapacityInputError as exc:
        # Another section's figure may be out of the planner's range; say so instead of losing the run.
        return f"the capacity plan could not be computed: {exc}"


def write(results: dict[str, Any], images: list[Path], write_docs: bool) -> str:
    names = [p.name for p in images]
    source = f"{results['command']} ({results['date']})"
    if write_docs:
        IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copy(image, IMAGES_DIR / image.name)
        update_measurements(MEASUREMENTS_PATH, measurements(results), source)
    plan_text = capacity_text()
    loadtest = loadtest_markdown(results, names, plan_text)
    ablations = ablations_markdown(results)
    out_dir = images[0].parent if images else Path(".")
    (out_dir / "report.md").write_text(loadtest + "\n\n" + ablations + "\n")
    if write_docs:
        replace_section(BENCHMARKS_PATH, "loadtest", loadtest)
        replace_section(BENCHMARKS_PATH, "ablations", ablations)
    headline = [
        f"{label}: {_rate(summary_of(run)['max_rps_slo'])} req/s at p99 < 100 ms, p99 at {FIXED_RPS:g} req/s "
        f"{_ms(summary_of(run)['p99_fixed_ms'])}, {_rate(summary_of(run)['server_rps_per_cpu_s'])} req per server "
        "CPU-s"
        for label, run in _by_label(results).items()
    ]
    return "\n".join(
        [*headline, f"report: {out_dir / 'report.md'}" + (" and docs/BENCHMARKS.md" if write_docs else "")]
    )
