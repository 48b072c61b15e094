"""The load-test report's arithmetic on hand-made steps (no load is run)."""

from __future__ import annotations

from loadtest.report import cores_needed_lines, summary_of


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
    (text, _blank) = cores_needed_lines(
        best, stack_cpu=0.5, locust_cpu=0.1, cores=2, target_per_core=936, saturated=True
    )
    # 500 + 100 us per request at 1,872 req/s = 1.12 cores = 56% of 2; 0.6 cores busy at the best step = 30%.
    assert "the stack 500 µs" in text and "locust 100 µs" in text
    assert "**1.12 cores of CPU work, 56% of the machine**" in text
    assert "30% busy, and the next step did not hold the objective" in text
    (unsaturated, _) = cores_needed_lines(best, 0.5, 0.1, 2, 936, saturated=False)
    assert "(the highest step offered)" in unsaturated


def test_without_a_load_generator_figure_nothing_is_claimed() -> None:
    assert (
        cores_needed_lines(
            step(100, True), stack_cpu=0.5, locust_cpu=None, cores=2, target_per_core=936, saturated=True
        )
        == []
    )


def test_saturated_only_when_a_later_step_missed() -> None:
    assert summary_of({"steps": [step(10, True), step(20, True), step(40, False)]})["saturated"]
    assert not summary_of({"steps": [step(10, True), step(20, True)]})["saturated"]
