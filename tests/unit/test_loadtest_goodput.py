"""The goodput scenarios' request generators and arithmetic on hand-made timelines (no load is run)."""

from __future__ import annotations

import argparse
import random

import pytest

from loadtest.goodput import ADMISSION, parse_variant
from loadtest.recovery import Second, best_latency_step, cold_cache_summary, recovery_s
from loadtest.traffic import DEVICES, PAGE_TYPES, NeverAsked, Weighted, draw_context, most_asked, zipf_weights


def never_asked(users: int = 7, seed: int = 3) -> NeverAsked:
    names = [f"u{i}" for i in range(users)]
    return NeverAsked(Weighted(names, zipf_weights(users, 1.0)), random.Random(seed))


def test_never_asked_draws_every_combination_once_then_none() -> None:
    pool = never_asked()
    drawn = [pool.draw() for _ in range(pool.size)]
    assert None not in drawn
    assert len(set(drawn)) == pool.size == 7 * len(PAGE_TYPES) * len(DEVICES)
    assert pool.draw() is None


def test_never_asked_reset_starts_a_fresh_pool() -> None:
    pool = never_asked()
    first = {pool.draw() for _ in range(50)}
    pool.reset()
    again = [pool.draw() for _ in range(pool.size)]
    assert len(set(again)) == pool.size
    assert first <= set(again)


def test_never_asked_favours_the_hot_users_while_they_have_contexts_left() -> None:
    pool = never_asked(users=50)
    early = [drawn[0] for drawn in (pool.draw() for _ in range(20)) if drawn]
    assert early.count("u0") > early.count("u49")


def test_each_request_draws_its_own_page_type_and_device() -> None:
    rng = random.Random(1)
    contexts = {draw_context(rng) for _ in range(500)}
    assert {p for p, _ in contexts} == {p for p, _ in PAGE_TYPES}
    assert {d for _, d in contexts} == {d for d, _ in DEVICES}


def series(values: list[float], hit: list[float] | None = None) -> list[Second]:
    hit = hit or [1.0] * len(values)
    return [
        Second(float(t + 1), {"cache": v * h, "precomputed": v * (1 - h)})
        for t, (v, h) in enumerate(zip(values, hit, strict=True))
    ]


def test_recovery_is_the_start_of_the_first_window_back_at_the_target() -> None:
    # emptied at t=10; throughput falls to 50 for 6 s and is back at 100 from the 17th second on
    values = [100.0] * 10 + [50.0] * 6 + [100.0] * 10
    assert recovery_s(series(values), since_t=10.0, target=95.0) == 6.0


def test_recovery_that_never_happens_is_none_and_one_without_a_dip_is_zero() -> None:
    assert recovery_s(series([100.0] * 5 + [50.0] * 20), since_t=5.0, target=90.0) is None
    assert recovery_s(series([100.0] * 20), since_t=5.0, target=90.0) == 0.0


def test_hit_share_recovery_reads_the_sources() -> None:
    hits = [0.9] * 5 + [0.1] * 10 + [0.9] * 10
    assert recovery_s(series([100.0] * 25, hits), since_t=5.0, target=0.81, value="hit_share") == 10.0


def step(index: int, rps: float, p99: float, *, fallbacks: float = 0.0, warmup: bool = False) -> dict[str, object]:
    return {
        "step": index,
        "warmup": warmup,
        "users": int(rps / 10),
        "achieved_rps": rps,
        "p99_ms": p99,
        "window_s": 10.0,
        "requests": int(rps * 10),
        "failures": {},
        "sources": {"cache": int(rps * 10 * (1 - fallbacks)), "precomputed": int(rps * 10 * fallbacks)},
        "latency_ok": p99 < 100,
        "slo_ok": p99 < 100 and fallbacks < 0.01,
        "cpu_s": {"server": 1.0},
    }


def test_the_best_never_asked_step_may_answer_from_fallbacks() -> None:
    steps = [step(0, 100, 40), step(1, 300, 80, fallbacks=0.6), step(2, 350, 140)]
    best = best_latency_step(steps)
    assert best is not None and best["achieved_rps"] == 300


def test_cold_cache_summary_needs_a_warm_baseline() -> None:
    with pytest.raises(ValueError, match="expected a measured step before step 1"):
        cold_cache_summary([step(0, 100, 40, warmup=True), step(1, 100, 40)], [], emptied_t=20.0, emptied_step=1)


def test_variants_are_admission_on_plus_named_settings() -> None:
    name, env = parse_variant("tuned:RECSERVE_ADMISSION_SLOW_PERCENT=90,RECSERVE_ADMISSION_INITIAL_LIMIT=32")
    assert name == "tuned"
    assert env == {
        ADMISSION: "true",
        "RECSERVE_ADMISSION_SLOW_PERCENT": "90",
        "RECSERVE_ADMISSION_INITIAL_LIMIT": "32",
    }
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME:RECSERVE_X=V"):
        parse_variant("tuned:SLOW=90")


def test_the_most_asked_combinations_come_hottest_user_and_context_first() -> None:
    users = Weighted([f"u{i}" for i in range(10)], zipf_weights(10, 1.0))
    combos = most_asked(users, 30)
    assert combos[:2] == [("u0", "home", "web"), ("u0", "product", "web")]
    assert len(set(combos)) == 30
    assert ("u9", "cart", "tv") not in combos
