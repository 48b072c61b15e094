"""The load-test report's arithmetic on hand-made steps (no load is run)."""

from __future__ import annotations

from loadtest.plots import fallback_rate_series
from loadtest.report import cores_needed_lines, overload_lines, summary_of


def step(users: int, ok: bool, **extra: object) -> dict[str, object]:
    return {
        "users": users,
        "slo_ok": ok,
        "warmup": False,
        "achieved_rps": users * 10.0,
        "offered_rps": users * 10.0,
        "requests": users * 100,
        "sources": {"cache": 9, "realtime": 1},
        "fallback_share": 0.0,
        "failure_share": 0.0,
        "cpu_s": {"server": 1.0},
        **extra,
    }


def test_cores_needed_adds_the_stack_and_the_load_generator_per_request() -> None:
    best = step(100, True, cpu_cores={"server": 0.4, "redis": 0.1}, load_generator_cores=0.1)
    best["requests"] = 1000
    after = step(130, False, cpu_cores={"server": 1.0, "redis": 0.2}, load_generator_cores=0.2)
    (text, _blank) = cores_needed_lines(
        best, stack_cpu=0.5, locust_cpu=0.1, cores=2, target_per_core=936, next_step=after
    )
    # 500 + 100 us per request at 1,872 req/s = 1.12 cores = 56% of 2; 0.6 cores busy at the best step = 30%.
    assert "the stack 500 µs" in text and "locust 100 µs" in text
    assert "**1.12 cores of CPU work, 56% of the machine**" in text
    assert "30% busy; at the next step (130 users)" in text
    assert "the orchestrator used 1.00 cores and the machine was 70% busy." in text
    (one_process, _) = cores_needed_lines(best, 0.5, 0.1, 2, 936, next_step=after, one_worker=True)
    assert "the process, not the machine, was the limit" in one_process
    (last, _) = cores_needed_lines(best, 0.5, 0.1, 2, 936, next_step=None)
    assert "(the highest step offered)" in last


def test_without_a_load_generator_figure_nothing_is_claimed() -> None:
    lines = cores_needed_lines(
        step(100, True), stack_cpu=0.5, locust_cpu=None, cores=2, target_per_core=936, next_step=None
    )
    assert lines == []


def test_saturated_only_when_a_later_step_missed() -> None:
    saturated = summary_of({"steps": [step(10, True), step(20, True), step(40, False)]})
    assert saturated["saturated"] and saturated["next_step"]["users"] == 40
    last = summary_of({"steps": [step(10, True), step(20, True)]})
    assert not last["saturated"] and last["next_step"] is None


def mix90_results(*steps: dict[str, object]) -> dict[str, object]:
    return {"runs": [{"label": "mix90", "scenario": "mix90", "steps": list(steps), "timeline": []}]}


def test_past_the_best_step_a_run_that_kept_answering_is_told_apart_from_a_collapse() -> None:
    best = step(160, True, p99_ms=34.0)
    shedding = step(180, False, p99_ms=120.0, fallback_share=0.6, cpu_s={"server": 1.1}, requests=16_000)
    (_title, _, text, _, table, _end) = overload_lines(mix90_results(best, shedding))
    assert "shed load rather than collapsing" in text and "(1,800 req/s or more, against 1,600" in text
    assert "at most 1.10x the best step's" in text and "(up to 60% of answers)" in text
    assert "what those steps missed: fallbacks, p99." in text
    assert table.splitlines()[3].startswith("| 180 | 1,800 | 120.0 ms | 60.0% | 0.0% |")
    costlier = step(180, False, p99_ms=150.0, fallback_share=0.6, cpu_s={"server": 2.0}, requests=16_000)
    assert "collapsed: past the best step" in overload_lines(mix90_results(best, costlier))[2]
    fewer = step(180, False, p99_ms=150.0, fallback_share=0.6, achieved_rps=1200.0)
    assert "collapsed: past the best step" in overload_lines(mix90_results(best, fewer))[2]
    assert overload_lines(mix90_results(best)) == []  # nothing was run past it


def test_fallbacks_per_second_by_reason_and_the_late_loop_share_come_from_the_scraped_counters() -> None:
    timeline = [
        {"t": 0.0, "fallbacks": {}, "loop_lag_at_most": {"0.005": 100.0, "+Inf": 100.0}},
        {"t": 1.0, "fallbacks": {"deadline": 30.0}, "loop_lag_at_most": {"0.005": 250.0, "+Inf": 300.0}},
        {"t": 3.0, "fallbacks": {"deadline": 30.0, "overload": 10.0}, "loop_lag_at_most": {}},
    ]
    times, rates, late = fallback_rate_series(timeline)
    assert times == [1.0, 3.0]
    assert rates == {"deadline": [30.0, 0.0], "overload": [0.0, 5.0]}
    assert late == [0.25, 0.0]  # 50 of 200 samples over 5 ms; then no samples: nothing claimed
