"""Goodput under overload: the cold-cache and never-asked scenarios, each with admission by
capacity on (as shipped) and off (``RECSERVE_ABLATION_ADMISSION_ENABLED=false``), side by side.

    python -m loadtest.goodput                  # warm search, cold cache, never asked, no-cache maximum
    python -m loadtest.goodput --phase-s 20     # seconds per load step of the cold-cache run (default 20)
    python -m loadtest.goodput --variant tuned:RECSERVE_ADMISSION_SLOW_PERCENT=90,RECSERVE_ADMISSION_INITIAL_LIMIT=32

1. ``warm``: ``ContextUser`` traffic (personalised lists only, Zipf over users, a page type and a device per
   request) stepping up on a primed cache: the warm throughput W, the highest at p99 < 100 ms with under 1%
   failed (fallbacks allowed: a warm cache still misses on its tail).
2. ``cold_cache``: per variant, a fresh orchestrator at W's load: one step at half of it (warms the
   cache), one at W (the warm baseline), then the cache is emptied under that load (loadtest/cachectl.py:
   the Redis lists and the process's local layer) and three more steps follow; the 1 s timeline gives the
   answers' sources over time and the time until throughput and hit share are back to 90% of the baseline.
3. ``never_asked``: per variant, ``NeverAskedUser`` stepping up, every request a (user, page type, device)
   not asked before (the cache and the pool are emptied as each step begins): the highest throughput at
   p99 < 100 ms, CPU per request and computed answers per second.
4. ``no_cache``: the computed-answer maximum (every request computed, admission as shipped).

Results under build/loadtest/goodput/ (results.json, one folder per run); docs/LOADTEST.md's ``goodput``
section and docs/img/loadtest_cold_cache.png unless ``--no-docs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.driver import (
    LOADTEST_DIR,
    RATE_PER_USER,
    SCENARIOS,
    RunOptions,
    Scenario,
    Stack,
    local_stack,
    log,
    run_scenario,
)
from loadtest.recovery import (
    ANSWER_SOURCES,
    RECOVERED_SHARE,
    best_latency_step,
    cold_cache_summary,
    cpu_us_per_request,
    hit_share,
    median_during,
    source_rate,
)
from loadtest.results import best_step

OUT_DIR = LOADTEST_DIR / "goodput"
REPO_ROOT = Path(__file__).resolve().parent.parent
LOADTEST_DOC = REPO_ROOT / "docs" / "LOADTEST.md"
IMAGE = "loadtest_cold_cache.png"
ADMISSION = "RECSERVE_ABLATION_ADMISSION_ENABLED"
VARIANTS: dict[str, dict[str, str]] = {"admission_on": {ADMISSION: "true"}, "admission_off": {ADMISSION: "false"}}

# Users of 10 requests/s each. The warm search starts where a cold cache would already struggle.
WARM_STEPS = (10, 20, 30, 40, 60, 80, 100, 130, 160, 200, 260, 300)
WARM_PRE_STEPS = (5, 5, 5)  # unmeasured: the hot users' contexts get cached before the steps
# About 80% of ContextUser's requests (Zipf s=1 over 1,000 users, 20 contexts each) ask one of these.
PRIME_CONTEXTS = 3000
NEVER_ASKED_STEPS = (2, 5, 10, 15, 20, 30, 40, 60, 80, 100, 130)
TARGET_NEVER_ASKED_SHARE_OF_WARM = 0.40
TARGET_COMPUTED_SHARE_OF_NO_CACHE = 0.60
TARGET_RECOVERY_S = 60.0


def loadavg() -> str:
    """1, 5 and 15 min load averages (the machine is shared: other work shows here)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _steps_env(
    steps: Sequence[int],
    warm_steps: int,
    fixed_steps: int,
    stop_on: str,
    stack: Stack,
    step_s: float,
    empty_at: str = "",
) -> dict[str, str]:
    return {
        "LOADTEST_STEPS": ",".join(str(s) for s in steps),
        "LOADTEST_WARM_STEPS": str(warm_steps),
        "LOADTEST_FIXED_STEPS": str(fixed_steps),
        "LOADTEST_STOP_ON": stop_on,
        "LOADTEST_STEP_S": str(step_s),
        "LOADTEST_REDIS_URL": stack.redis_url,
        "LOADTEST_EMPTY_CACHE_AT": empty_at,
    }


def _run(stack: Stack, scenario: Scenario, label: str, options: RunOptions, env: dict[str, str]) -> dict[str, Any]:
    before = loadavg()
    run = run_scenario(stack, scenario, label, replace(options, step_s=float(env["LOADTEST_STEP_S"])), env)
    run["loadavg_before"], run["loadavg_after"] = before, loadavg()
    log(f"{label}: load average before {before}, after {run['loadavg_after']}")
    return run


def warm_search(stack: Stack, options: RunOptions) -> dict[str, Any]:
    scenario = Scenario(
        "warm",
        "ContextUser on a primed cache, stepping up",
        user_class="ContextUser",
        steps=WARM_STEPS,
        prime_contexts=PRIME_CONTEXTS,
    )
    steps = WARM_PRE_STEPS + WARM_STEPS
    env = _steps_env(steps, len(WARM_PRE_STEPS), len(WARM_PRE_STEPS) + 1, "latency", stack, options.step_s)
    return _run(stack, scenario, "warm", options, env)


def cold_cache(
    stack: Stack, variant: str, settings: dict[str, str], users: int, phase_s: float, options: RunOptions
) -> dict[str, Any]:
    scenario = Scenario(
        "cold_cache",
        f"cache emptied at {users * RATE_PER_USER:g} req/s offered ({variant})",
        settings,
        user_class="ContextUser",
        prime_contexts=PRIME_CONTEXTS,
    )
    # half load (warms), the warm baseline, then emptied at index 2 and three steps of recovery
    steps = (max(1, users // 2), users, users, users, users)
    env = _steps_env(steps, 1, len(steps), "latency", stack, phase_s, empty_at="2")
    run = _run(stack, scenario, f"cold_cache_{variant}", options, env)
    emptied = run.get("cache_emptied", [])
    if emptied:
        run["summary"] = cold_cache_summary(run["steps"], run["timeline"], emptied[0]["t"], emptied[0]["step"])
    return run


def never_asked(stack: Stack, variant: str, settings: dict[str, str], options: RunOptions) -> dict[str, Any]:
    scenario = Scenario(
        "never_asked",
        f"every request a never-asked (user, page type, device) ({variant})",
        settings,
        user_class="NeverAskedUser",
        steps=NEVER_ASKED_STEPS,
    )
    env = _steps_env(NEVER_ASKED_STEPS, 0, 1, "latency", stack, options.step_s, empty_at="all")
    return _run(stack, scenario, f"never_asked_{variant}", options, env)


def no_cache(stack: Stack, options: RunOptions) -> dict[str, Any]:
    scenario = SCENARIOS["no_cache"]
    env = _steps_env(scenario.steps, 0, 1, "slo", stack, options.step_s)
    return _run(stack, scenario, "no_cache", options, env)


# --- the report ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _sources(sources: dict[str, int]) -> str:
    total = sum(sources.values()) or 1
    return ", ".join(f"{s} {sources.get(s, 0) / total:.0%}" for s in ANSWER_SOURCES if sources.get(s))


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, per variant, with the targets of docs/LOADTEST.md."""
    runs = {run["label"]: run for run in results["runs"]}
    warm = best_latency_step(runs["warm"]["steps"]) if "warm" in runs else None
    warm_rps = float(warm["achieved_rps"]) if warm else None
    nc_best = best_step(runs["no_cache"]["steps"]) if "no_cache" in runs else None
    nc_max_computed = (
        max((source_rate(s, "realtime") for s in runs["no_cache"]["steps"] if not s.get("warmup")), default=0.0)
        if "no_cache" in runs
        else None
    )
    out: dict[str, Any] = {
        "warm_rps": warm_rps,
        "warm_users": warm["users"] if warm else None,
        "warm_p99_ms": warm.get("p99_ms") if warm else None,
        "warm_hit_share": hit_share(warm) if warm else None,
        "no_cache_rps_slo": float(nc_best["achieved_rps"]) if nc_best else None,
        "no_cache_computed_max": nc_max_computed,
        "no_cache_computed_slo": source_rate(nc_best, "realtime") if nc_best else None,
        "variants": {},
    }
    for variant in results["variants"]:
        entry: dict[str, Any] = {}
        cold = runs.get(f"cold_cache_{variant}")
        if cold and "summary" in cold:
            entry["cold"] = cold["summary"] | {"loadavg": [cold["loadavg_before"], cold["loadavg_after"]]}
        never = runs.get(f"never_asked_{variant}")
        if never:
            best = best_latency_step(never["steps"])
            computed_best = source_rate(best, "realtime") if best else None
            computed_max = max((source_rate(s, "realtime") for s in never["steps"]), default=0.0)
            reference = out["no_cache_computed_slo"]
            entry["never"] = {
                "best": best,
                "rps": float(best["achieved_rps"]) if best else 0.0,
                "p99_ms": best.get("p99_ms") if best else None,
                "failures": sum(best.get("failures", {}).values()) if best else None,
                "computed_per_s": computed_best,
                "computed_max_per_s": computed_max,
                "server_us": cpu_us_per_request(best) if best else None,
                "stack_us": cpu_us_per_request(best, ("server", "redis", "triton")) if best else None,
                "share_of_warm": float(best["achieved_rps"]) / warm_rps if best and warm_rps else None,
                "computed_share_of_no_cache": computed_best / reference if computed_best and reference else None,
                "repeats": never.get("never_asked_repeats", 0),
                "loadavg": [never["loadavg_before"], never["loadavg_after"]],
            }
        out["variants"][variant] = entry
    return out


def markdown(results: dict[str, Any], fig: dict[str, Any]) -> str:
    variants = list(results["variants"])
    described = ", ".join(f"`{v}` ({_env_text(env)})" for v, env in results["variants"].items())
    lines = [
        "## Goodput under overload: cold cache and never-asked contexts (`python -m loadtest.goodput`)",
        "",
        f"Last run: {results['date']}, `{results['command']}`, on {results['machine']}; load average (1/5/15 min) "
        f"{results['loadavg_before']} before and {results['loadavg_after']} after the whole run (the 2 cores are "
        "shared with other work and the load generator: figures are noisy; compare the variants of this one run). "
        f"Variants: {described}.",
        "",
        _warm_text(results, fig),
        "",
        f"No-cache maximum (`no_cache`, every request computed, admission as shipped): "
        f"{_f(fig['no_cache_rps_slo'])} req/s at the service level (p99 < 100 ms, < 1% fallbacks; ShopperUser "
        f"traffic, so {_f(fig['no_cache_computed_slo'])} of them computed answers/s: the reference of the 60% "
        f"target); at most {_f(fig['no_cache_computed_max'])} computed answers/s in any step.",
        "",
        "### (a) Cold cache under warm load",
        "",
        "The cache (Redis lists and the process's local layer) emptied under the warm load; the baseline is the "
        "step just before. Recovery: from the emptying to the start of the first 5 s whose mean is at least "
        f"{RECOVERED_SHARE:.0%} of the baseline (target: within {TARGET_RECOVERY_S:g} s).",
        "",
    ]
    rows = []
    for v in variants:
        cold = fig["variants"][v].get("cold")
        if not cold:
            continue
        warm = cold["warm"]
        rows.append(
            [
                f"`{v}`",
                f"{_f(warm['achieved_rps'])} req/s, {_pct(warm['hit_share'])} hits",
                *[
                    f"{_f(a['achieved_rps'])} req/s, {_pct(a['hit_share'])} hits, p99 {_f(a['p99_ms'], 0)} ms; "
                    f"{_sources(a['sources'])}"
                    for a in cold["after"][:3]
                ],
                _f(cold["recovery_throughput_s"], 0, " s")
                if cold["recovery_throughput_s"] is not None
                else "not within the run",
                _f(cold["recovery_hit_share_s"], 0, " s")
                if cold["recovery_hit_share_s"] is not None
                else "not within the run",
                " / ".join(cold["loadavg"]),
            ]
        )
    phase = results.get("phase_s", 20)
    header = [
        "variant",
        "warm baseline",
        f"0-{phase:g} s after",
        f"{phase:g}-{2 * phase:g} s",
        f"{2 * phase:g}-{3 * phase:g} s",
        "to 90% throughput",
        "to 90% hit share",
        "load avg before / after",
    ]
    lines += [_table(header, rows), "", f"![answer sources over time, cache emptied at 0 s](img/{IMAGE})", ""]
    lines += [
        "### (b) Never-asked (user, page type, device): every request a cache miss",
        "",
        "Steps of 10 s; the cache and the pool of combinations are emptied as each step begins. Best step: the "
        "highest throughput at p99 < 100 ms with under 1% failed (fallbacks allowed). Targets: at least "
        f"{TARGET_NEVER_ASKED_SHARE_OF_WARM:.0%} of the warm throughput with no 5xx, and computed answers at "
        f"{TARGET_COMPUTED_SHARE_OF_NO_CACHE:.0%} or more of the no-cache maximum (its computed answers per second "
        "at its best step at the service level).",
        "",
    ]
    rows = []
    for v in variants:
        never = fig["variants"][v].get("never")
        if not never:
            continue
        best = never["best"] or {}
        rows.append(
            [
                f"`{v}`",
                f"{_f(never['rps'])} req/s ({_f(best.get('offered_rps'))} offered)",
                _f(never["p99_ms"], 1),
                _f(never["failures"]),
                _f(never["computed_per_s"]),
                _f(never["computed_max_per_s"]),
                _f(never["server_us"]),
                _f(never["stack_us"]),
                _sources(best.get("sources", {})),
                _verdict(never["share_of_warm"], TARGET_NEVER_ASKED_SHARE_OF_WARM),
                _verdict(never["computed_share_of_no_cache"], TARGET_COMPUTED_SHARE_OF_NO_CACHE),
                " / ".join(never["loadavg"]),
            ]
        )
    header = [
        "variant",
        "throughput at p99 < 100 ms",
        "p99 ms",
        "failed",
        "computed/s",
        "max computed/s (any step)",
        "server CPU µs/req",
        "stack CPU µs/req",
        "sources",
        "of warm (≥ 40%)",
        "computed of no-cache (≥ 60%)",
        "load avg before / after",
    ]
    lines += [_table(header, rows), "", "Every step of the never-asked runs (and of `no_cache`):", ""]
    rows = [
        [
            f"`{run['label']}`",
            _f(s["offered_rps"]),
            _f(s["achieved_rps"]),
            _f(s.get("p99_ms"), 1),
            _f(source_rate(s, "realtime")),
            _pct(s["fallback_share"]),
            _f(sum(s.get("failures", {}).values())),
            _f(cpu_us_per_request(s)),
            _f(median_during(run["timeline"], s["step"], "compute_limit")),
        ]
        for run in results["runs"]
        if run["scenario"] in ("never_asked", "no_cache")
        for s in run["steps"]
        if not s.get("warmup")
    ]
    header = [
        "run",
        "offered/s",
        "achieved/s",
        "p99 ms",
        "computed/s",
        "fallbacks",
        "failed",
        "server CPU µs/req",
        "compute limit (median)",
    ]
    lines += [_table(header, rows)]
    repeats = {v: fig["variants"][v]["never"]["repeats"] for v in variants if fig["variants"][v].get("never")}
    if any(repeats.values()):
        lines += ["", f"Requests that had to repeat a combination (pool exhausted within a step): {repeats}."]
    return "\n".join(lines)


def _warm_text(results: dict[str, Any], fig: dict[str, Any]) -> str:
    warm_run = next((r for r in results["runs"] if r["label"] == "warm"), None)
    if fig["warm_rps"] is not None:
        return (
            "Warm throughput (`warm`: ContextUser on a primed cache, the best step at p99 < 100 ms, under 1% "
            f"failed): **{_f(fig['warm_rps'])} req/s** at {_f(fig['warm_users'] * RATE_PER_USER)} offered, p99 "
            f"{_f(fig['warm_p99_ms'], 1)} ms, {_pct(fig['warm_hit_share'])} of answers from the cache."
        )
    if warm_run is None:
        return f"Warm load given (`--warm-users`): {_f(results.get('warm_users', 0) * RATE_PER_USER)} req/s offered."
    tried = "; ".join(
        f"{_f(s['achieved_rps'])} req/s p99 {_f(s.get('p99_ms'), 0)} ms"
        for s in warm_run["steps"]
        if not s.get("warmup")
    )
    return (
        "Warm throughput: **no step of the warm search met p99 < 100 ms** "
        f"({tried}); the cold-cache runs used its first step's load, "
        f"{_f(results.get('warm_users', 0) * RATE_PER_USER)} req/s offered, and the shares of warm below are n/a."
    )


def _env_text(env: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items())


def _verdict(share: float | None, target: float) -> str:
    if share is None:
        return "n/a"
    return f"{share:.0%} ({'met' if share >= target else 'NOT met'})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    from bench.runner import markdown_table

    return markdown_table(header, rows, align="l" * len(header))


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Answers per second by source around the emptying, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loadtest.plots import SOURCE_COLOURS
    from loadtest.recovery import seconds

    runs = [r for r in results["runs"] if r["scenario"] == "cold_cache" and r.get("cache_emptied")]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t0 = run["cache_emptied"][0]["t"]
        series = seconds(run["timeline"])
        ts = [s.t - t0 for s in series]
        stacks = [[s.answers.get(src, 0) for s in series] for src in ANSWER_SOURCES]
        failed = [s.answers.get("failed", 0) for s in series]
        ax.stackplot(
            ts,
            *stacks,
            failed,
            labels=[*ANSWER_SOURCES, "failed"],
            colors=[SOURCE_COLOURS[s] for s in ANSWER_SOURCES] + ["black"],
            alpha=0.85,
            step="pre",
        )
        warm = run.get("summary", {}).get("warm", {}).get("achieved_rps")
        if warm:
            ax.axhline(RECOVERED_SHARE * warm, color="k", ls=":", lw=1, label="90% of warm throughput")
        ax.axvline(0, color="k", ls="--", lw=1)
        ax.set_ylabel("answers/s")
        ax.set_title(run["label"].removeprefix("cold_cache_"), fontsize=10)
        ax.legend(loc="lower left", fontsize=7, ncol=6)
    axes[-1, 0].set_xlabel("seconds since the cache was emptied")
    fig.suptitle("Cold cache under warm load: answers by source (1 s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(results: dict[str, Any], image: Path | None) -> None:
    import shutil

    from bench.runner import IMAGES_DIR, replace_section

    if image is not None:
        IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, IMAGES_DIR / image.name)
    replace_section(LOADTEST_DOC, "goodput", markdown(results, figures(results)))


# --- the command ---------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:KEY=VALUE,KEY=VALUE`` (admission on, plus these settings)."""
    name, _, rest = text.partition(":")
    pairs = [p.split("=", 1) for p in rest.split(",") if p.strip()]
    if not name or any(len(p) != 2 or not p[0].startswith("RECSERVE_") for p in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME:RECSERVE_X=V[,RECSERVE_Y=W], got {text!r}")
    return name, {ADMISSION: "true", **{k: v for k, v in pairs}}


def main(argv: Sequence[str] | None = None) -> int:
    from bench.runner import Machine

    parser = argparse.ArgumentParser(prog="python -m loadtest.goodput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per step of the cold-cache run")
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds per step of the other runs")
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME:ENV",
        help="one more admission variant (repeatable)",
    )
    parser.add_argument("--only-variants", nargs="+", metavar="NAME", help="of admission_on, admission_off, ...")
    parser.add_argument("--warm-users", type=int, help="skip the warm search: this many users is the warm load")
    parser.add_argument("--skip", nargs="+", default=[], choices=("cold", "never", "no_cache"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--from-results", type=Path, metavar="JSON", help="redo the report only")
    args = parser.parse_args(argv)
    results: dict[str, Any]
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        image = plot(results, args.from_results.parent / IMAGE)
        if not args.no_docs:
            write_docs(results, image)
        print(markdown(results, figures(results)))
        return 0
    variants = dict(VARIANTS) | dict(args.variant)
    if args.only_variants:
        variants = {k: v for k, v in variants.items() if k in args.only_variants}
    options = RunOptions(step_s=args.step_s, warmup_s=2.0, out_dir=args.out)
    started = time.monotonic()
    machine = Machine.detect()
    results = {
        "command": " ".join(["python -m loadtest.goodput", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine.describe(),
        "loadavg_before": loadavg(),
        "phase_s": args.phase_s,
        "variants": variants,
        "runs": [],
    }
    runs: list[dict[str, Any]] = results["runs"]
    with local_stack("synthetic") as stack:
        if args.warm_users:
            warm_users = args.warm_users
        else:
            runs.append(warm_search(stack, options))
            best = best_latency_step(runs[-1]["steps"])
            warm_users = best["users"] if best else WARM_STEPS[0]
        log(f"warm load: {warm_users} users ({warm_users * RATE_PER_USER:g} req/s offered)")
        results["warm_users"] = warm_users
        for variant, settings in variants.items():
            if "cold" not in args.skip:
                runs.append(cold_cache(stack, variant, settings, warm_users, args.phase_s, options))
            if "never" not in args.skip:
                runs.append(never_asked(stack, variant, settings, options))
        if "no_cache" not in args.skip:
            runs.append(no_cache(stack, options))
    results["loadavg_after"] = loadavg()
    results["wall_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    image = plot(results, args.out / IMAGE)
    if not args.no_docs:
        write_docs(results, image)
    print(markdown(results, figures(results)), flush=True)
    log(f"done in {time.monotonic() - started:.0f} s; results under {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
