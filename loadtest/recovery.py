"""The arithmetic of the goodput scenarios (loadtest/goodput.py) on a run's 1 s timeline and steps: answers
per second by source, the warm baseline, and how long after the cache was emptied throughput and hit share
were back to 90% of it. Pure functions on JSON-ready data, so that they are unit-tested without load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.results import SLO_P99_MS, measured

ANSWER_SOURCES = ("cache", "realtime", "precomputed", "popular")
RECOVERED_SHARE = 0.9  # "back to 90% of warm"
RECOVERY_WINDOW_S = 5  # seconds averaged: one second alone is noise on a shared machine


@dataclass(frozen=True)
class Second:
    """One timeline point: the client's answers in the second that ended at ``t`` (seconds since start)."""

    t: float
    answers: dict[str, float]

    @property
    def total(self) -> float:
        """Everything answered (personalised by source, other kinds, and failures)."""
        return float(sum(self.answers.values()))

    @property
    def personalised(self) -> float:
        return float(sum(v for k, v in self.answers.items() if k not in ("other", "failed")))

    @property
    def hit_share(self) -> float | None:
        return self.answers.get("cache", 0.0) / self.personalised if self.personalised else None


def seconds(timeline: Sequence[dict[str, Any]]) -> list[Second]:
    return [Second(float(p["t"]), dict(p.get("answers", {}))) for p in timeline if "answers" in p]


def hit_share(step: dict[str, Any]) -> float:
    sources = step.get("sources", {})
    total = sum(sources.values())
    return sources.get("cache", 0) / total if total else 0.0


def source_rate(step: dict[str, Any], source: str) -> float:
    """Answers per second of one source over the step's measured window."""
    window_s = float(step.get("window_s", 0.0))
    return step.get("sources", {}).get(source, 0) / window_s if window_s > 0 else 0.0


def recovery_s(
    series: Sequence[Second],
    since_t: float,
    target: float,
    value: str = "total",
    window: int = RECOVERY_WINDOW_S,
) -> float | None:
    """Seconds from ``since_t`` to the start of the first ``window`` seconds after it whose mean ``value``
    (``total``: answers/s; ``hit_share``) is at least ``target``; None if none was. At 1 s resolution: a point
    counts the second that ended at its ``t``, so a window starting at point i starts one second before it."""
    after = [s for s in series if s.t - 1.0 >= since_t - 0.5]
    for i in range(len(after) - window + 1):
        chunk = [getattr(s, value) for s in after[i : i + window]]
        if None in chunk:
            continue
        if sum(chunk) / window >= target:
            return max(0.0, round(after[i].t - 1.0 - since_t, 1))
    return None


def best_latency_step(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest achieved throughput among the measured steps at p99 < 100 ms with under 1% failed,
    fallbacks allowed (``latency_ok``)."""
    passing = [s for s in measured(steps) if s.get("latency_ok", s.get("p99_ms", SLO_P99_MS) < SLO_P99_MS)]
    return max(passing, key=lambda s: float(s["achieved_rps"])) if passing else None


def median_during(timeline: Sequence[dict[str, Any]], step: int, key: str) -> float | None:
    """The median of a sampled gauge (``compute_limit``, ``compute_in_flight``) over one step's points."""
    values = sorted(float(p[key]) for p in timeline if p.get("step") == step and p.get(key) is not None)
    return values[len(values) // 2] if values else None


def cpu_us_per_request(step: dict[str, Any], components: Sequence[str] = ("server",)) -> float | None:
    cpu_s = sum(float(step.get("cpu_s", {}).get(c, 0.0)) for c in components)
    return cpu_s / step["requests"] * 1e6 if step.get("requests") else None


def cold_cache_summary(
    steps: Sequence[dict[str, Any]], timeline: Sequence[dict[str, Any]], emptied_t: float, emptied_step: int
) -> dict[str, Any]:
    """The warm baseline (the measured step just before the cache was emptied), the steps after it, and the
    time to 90% of the baseline's throughput and hit share."""
    before = [s for s in steps if s["step"] < emptied_step and not s.get("warmup")]
    after = [s for s in steps if s["step"] >= emptied_step]
    if not before:
        raise ValueError(f"expected a measured step before step {emptied_step} (the warm baseline), found none")
    warm = before[-1]
    warm_rps, warm_hits = float(warm["achieved_rps"]), hit_share(warm)
    series = seconds(timeline)
    return {
        "warm": {
            "achieved_rps": warm_rps,
            "hit_share": round(warm_hits, 4),
            "p99_ms": warm.get("p99_ms"),
            "sources": warm.get("sources", {}),
        },
        "after": [
            {
                "step": s["step"],
                "achieved_rps": s["achieved_rps"],
                "hit_share": round(hit_share(s), 4),
                "p99_ms": s.get("p99_ms"),
                "failures": sum(s.get("failures", {}).values()),
                "sources": s.get("sources", {}),
                "server_us_per_request": cpu_us_per_request(s),
            }
            for s in after
        ],
        "recovery_throughput_s": recovery_s(series, emptied_t, RECOVERED_SHARE * warm_rps, "total"),
        "recovery_hit_share_s": recovery_s(series, emptied_t, RECOVERED_SHARE * warm_hits, "hit_share"),
    }
