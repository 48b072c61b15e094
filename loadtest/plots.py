"""PNG plots of a load run (matplotlib, Agg): latency against offered load, throughput against users,
cache hit rate over time, the mix of sources, requests per server CPU-second, and the reference mix's
fallbacks by reason and event-loop lag over time (bursts and recovery)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtest.results import SLO_P99_MS, measured

SOURCES = ("cache", "realtime", "precomputed", "popular", "ceiling")
SOURCE_COLOURS = {
    "cache": "tab:green",
    "realtime": "tab:blue",
    "precomputed": "tab:orange",
    "popular": "tab:red",
    "ceiling": "tab:gray",
}
TIMELINE_SCENARIOS = ("full", "mix90", "no_local_cache", "no_single_flight", "no_batching", "cache_hit")


def first_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per scenario (the first), in run order."""
    return [run for run in results["runs"] if run["label"] == run["scenario"]]


def requests_per_cpu_s(step: dict[str, Any], component: str = "server") -> float | None:
    cpu = float(step.get("cpu_s", {}).get(component, 0.0))
    return step["requests"] / cpu if cpu > 0 else None


def hit_rate_series(timeline: Sequence[dict[str, Any]], smooth: int = 3) -> tuple[list[float], list[float]]:
    """(time s, hit rate) from the scraped counters, over ``smooth`` samples to damp 1 s jitter."""
    points = [p for p in timeline if "misses" in p]
    times, rates = [], []
    for before, after in zip(points, points[smooth:], strict=False):
        hits = (after["hits_local"] + after["hits_redis"]) - (before["hits_local"] + before["hits_redis"])
        misses = after["misses"] - before["misses"]
        if hits + misses > 0:
            times.append(float(after["t"]))
            rates.append(hits / (hits + misses))
    return times, rates


def fallback_rate_series(
    timeline: Sequence[dict[str, Any]],
) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """(time s, fallbacks per second by reason, share of event-loop lag samples over 5 ms) per 1 s sample."""
    points = [p for p in timeline if "fallbacks" in p]
    reasons = sorted({reason for p in points for reason in p["fallbacks"]})
    times: list[float] = []
    rates: dict[str, list[float]] = {reason: [] for reason in reasons}
    late: list[float] = []
    for before, after in itertools.pairwise(points):
        elapsed = float(after["t"]) - float(before["t"])
        if elapsed <= 0:
            continue
        times.append(float(after["t"]))
        for reason in reasons:
            rates[reason].append((after["fallbacks"].get(reason, 0.0) - before["fallbacks"].get(reason, 0.0)) / elapsed)
        lag_after, lag_before = after.get("loop_lag_at_most", {}), before.get("loop_lag_at_most", {})
        samples = lag_after.get("+Inf", 0.0) - lag_before.get("+Inf", 0.0)
        on_time = lag_after.get("0.005", 0.0) - lag_before.get("0.005", 0.0)
        late.append(1 - on_time / samples if samples > 0 else 0.0)
    return times, rates, late


def _caption(fig: Any, results: dict[str, Any]) -> None:
    machine = results["machine"]
    fig.text(
        0.01,
        0.005,
        f"{results['command']} · {results['date']} · {machine['cores']} cores, load generator on the same cores "
        "(CPU, not GPU figures)",
        fontsize=7,
        color="dimgray",
    )


def _save(fig: Any, results: dict[str, Any], path: Path) -> Path:
    _caption(fig, results)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run in first_runs(results):
        steps = measured(run["steps"])
        x = [s["offered_rps"] for s in steps if "p99_ms" in s]
        line = ax.plot(x, [s["p99_ms"] for s in steps if "p99_ms" in s], marker="o", label=f"{run['scenario']} p99")
        ax.plot(x, [s["p50_ms"] for s in steps if "p50_ms" in s], linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax.axhline(SLO_P99_MS, color="black", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], SLO_P99_MS * 1.05, " p99 objective 100 ms", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="offered load (requests/s)", ylabel="latency (ms)")
    ax.set_title("Latency against offered load (solid p99, dashed p50)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, results, path)


def plot_throughput(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = 0.0
    for run in first_runs(results):
        steps = measured(run["steps"])
        users = [s["users"] for s in steps]
        ax.plot(users, [s["achieved_rps"] for s in steps], marker="o", label=run["scenario"])
        ok = [s for s in steps if s["slo_ok"]]
        ax.scatter([s["users"] for s in ok], [s["achieved_rps"] for s in ok], s=60, facecolors="none", edgecolors="k")
        top = max([top, *users])
    rate = results.get("rate_per_user", 10.0)
    ax.plot([0, top], [0, top * rate], color="gray", linestyle=":", label="offered")
    ax.set(xlabel="locust users (10 requests/s each)", ylabel="achieved requests/s")
    ax.set_title("Throughput against users (circled: step met p99 < 100 ms with < 1% fallbacks)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, results, path)


def plot_hit_rate(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5))
    for run in first_runs(results):
        if run["scenario"] not in TIMELINE_SCENARIOS:
            continue
        times, rates = hit_rate_series(run["timeline"])
        if times:
            ax.plot(times, [100 * r for r in rates], label=run["scenario"])
    ax.axhline(90, color="black", linewidth=0.8, linestyle=":")
    ax.text(0, 91, " reference design: 90% from cache", fontsize=8)
    ax.set(xlabel="seconds since the scenario started (load steps up every step)", ylabel="cache hit rate (%)")
    ax.set_ylim(0, 102)
    ax.set_title("Cache hit rate over time (from /metrics, scraped every second; cache cold at t=0)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, results, path)


def plot_sources(results: dict[str, Any], path: Path) -> Path:
    runs = first_runs(results)
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [run["scenario"] for run in runs]
    bottoms = [0.0] * len(runs)
    totals = [sum(sum(s["sources"].values()) for s in measured(run["steps"])) or 1 for run in runs]
    for source in SOURCES:
        shares = [
            100 * sum(s["sources"].get(source, 0) for s in measured(run["steps"])) / total
            for run, total in zip(runs, totals, strict=True)
        ]
        if any(shares):
            ax.bar(names, shares, bottom=bottoms, label=source, color=SOURCE_COLOURS[source])
            bottoms = [b + v for b, v in zip(bottoms, shares, strict=True)]
    ax.set(ylabel="% of personalised answers (all measured steps)")
    ax.set_title("Where the answers came from (source field), per scenario")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, results, path)


def plot_efficiency(results: dict[str, Any], path: Path) -> Path:
    """Requests per server CPU-second at each scenario's highest load step that completed."""
    runs = first_runs(results)
    names, values = [], []
    for run in runs:
        rates = [r for r in (requests_per_cpu_s(s) for s in measured(run["steps"])) if r is not None]
        if rates:
            names.append(run["scenario"])
            values.append(max(rates))
    fig, ax = plt.subplots(figsize=(9, 5))
    bars = ax.bar(names, values, color="tab:purple")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set(yscale="log", ylabel="requests per CPU-second of the server process (best step)")
    ax.set_title("Server efficiency: requests per core-second (load generator excluded)")
    ax.tick_params(axis="x", rotation=20)
    return _save(fig, results, path)


def plot_overload(results: dict[str, Any], path: Path, scenario: str = "mix90") -> Path | None:
    """Fallbacks per second by reason and event-loop lag over one scenario's run: bursts and recovery."""
    run = next((r for r in first_runs(results) if r["scenario"] == scenario), None)
    if run is None:
        return None
    times, rates, late = fallback_rate_series(run["timeline"])
    if not times:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(2, 1))
    for reason, values in rates.items():
        top.plot(times, values, label=reason, linewidth=1.2)
    top_y = top.get_ylim()[1]
    for step in measured(run["steps"]):
        start = next((float(p["t"]) for p in run["timeline"] if p["step"] == step["step"]), None)
        if start is not None:
            top.axvline(start, color="lightgray", linewidth=0.8)
            top.text(start, top_y, f" {step['users']}u", fontsize=6, color="gray", va="top")
    top.set(ylabel="fallback answers per second")
    top.set_title(f"{scenario}: fallbacks by reason and event-loop lag over the run (load steps up at each line)")
    top.legend(fontsize=8, loc="upper left")
    top.grid(True, alpha=0.3)
    bottom.plot(times, [100 * v for v in late], color="tab:red", linewidth=1.0)
    bottom.set(xlabel="seconds since the scenario started", ylabel="% of loop samples\nlate by > 5 ms")
    bottom.grid(True, alpha=0.3)
    return _save(fig, results, path)


def plot_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [
        plot_latency(results, out_dir / "loadtest_latency.png"),
        plot_throughput(results, out_dir / "loadtest_throughput.png"),
        plot_hit_rate(results, out_dir / "loadtest_cache_hit_rate.png"),
        plot_sources(results, out_dir / "loadtest_sources.png"),
        plot_efficiency(results, out_dir / "loadtest_efficiency.png"),
    ]
    overload = plot_overload(results, out_dir / "loadtest_overload.png")
    return images + ([overload] if overload is not None else [])
