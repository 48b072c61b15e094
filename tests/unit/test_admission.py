"""The admission limiter (orchestrator/admission.py) on a fake clock: it admits up to its limit and refuses
beyond it at once, backs off on missed or slow computations (once per window, never below its floor), grows
on fast ones that found it full (never above its ceiling), and moves on nothing else."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from orchestrator.admission import AimdLimiter, Permit, Unlimited
from orchestrator.config import Ablations, AdmissionSettings, Settings

SLOW_S = 0.040


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limiter(initial: int = 4, low: int = 2, high: int = 8, clock: Clock | None = None) -> AimdLimiter:
    return AimdLimiter(initial, low, high, slow_s=SLOW_S, backoff_ratio=0.5, clock=clock or Clock())


def take(limits: AimdLimiter, count: int) -> list[Permit]:
    permits = [limits.try_acquire() for _ in range(count)]
    assert all(p is not None for p in permits)
    return [p for p in permits if p is not None]


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_it_admits_up_to_the_limit_and_refuses_the_next_at_once_until_one_ends() -> None:
    limits = limiter(initial=3)
    permits = take(limits, 3)
    assert limits.try_acquire() is None  # no wait, no queue: the caller answers from the fallback now
    assert (limits.in_flight, gauge("recserve_compute_in_flight"), gauge("recserve_compute_limit")) == (3, 3, 3)
    permits[0].succeeded()
    assert limits.in_flight == 2
    assert limits.try_acquire() is not None


def test_a_missed_computation_backs_off_once_per_window_and_never_below_the_floor() -> None:
    limits = limiter(initial=8, low=2, high=8)
    stalled = take(limits, 8)
    for permit in stalled:  # one stall makes every computation in flight miss at once: one signal
        permit.missed()
    assert limits.limit == 4
    take(limits, 1)[0].missed()  # admitted after the backoff: a new window
    assert limits.limit == 2
    take(limits, 1)[0].missed()
    assert limits.limit == 2  # the floor: some computations always run, so the cache refills


def test_a_computation_in_time_but_slower_than_the_margin_counts_as_missed() -> None:
    clock = Clock()
    limits = limiter(initial=4, clock=clock)
    permit = take(limits, 1)[0]
    clock.now = SLOW_S + 0.001
    permit.succeeded()
    assert limits.limit == 2


def test_fast_computations_that_found_the_limit_full_grow_it_up_to_the_ceiling() -> None:
    clock = Clock()
    limits = limiter(initial=2, low=1, high=3, clock=clock)
    for _ in range(20):
        for permit in take(limits, limits.limit):  # each window fills the limit
            clock.now += 0.005
            permit.succeeded()
    assert limits.limit == 3


def test_fast_computations_that_did_not_need_the_limit_leave_it_where_it_is() -> None:
    limits = limiter(initial=4)
    for _ in range(50):
        take(limits, 1)[0].succeeded()  # one at a time, never near the limit of 4
    assert limits.limit == 4


def test_a_computation_that_ended_for_a_reason_that_says_nothing_about_capacity_moves_nothing() -> None:
    limits = limiter(initial=4)
    for permit in take(limits, 4):
        permit.ignored()  # a shard down, Triton down, an unknown user, cancelled or abandoned
    assert (limits.limit, limits.in_flight) == (4, 0)


def test_an_outcome_counts_once_whatever_is_said_after_it() -> None:
    limits = limiter(initial=4)
    permit = take(limits, 1)[0]
    permit.missed()
    permit.ignored()  # the flow's `finally`
    permit.missed()
    assert (limits.limit, limits.in_flight) == (2, 0)


def test_without_admission_every_computation_is_admitted_and_counted() -> None:
    unlimited = Unlimited()
    permits = [unlimited.try_acquire() for _ in range(1000)]
    assert gauge("recserve_compute_limit") == math.inf and gauge("recserve_compute_in_flight") == 1000
    for permit in permits:
        permit.missed()
    assert unlimited.in_flight == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((4, 5, 8, 0.04, 0.9), r"1 <= min_limit <= initial_limit <= max_limit, but found 5, 4, 8"),
        ((4, 2, 8, 0.04, 1.5), r"backoff_ratio must be in \(0, 1\], but found 1.5"),
        ((4, 2, 8, 0.0, 0.9), r"slow_s must be > 0, but found 0.0"),
    ],
)
def test_bad_bounds_are_refused_naming_the_rule(arguments: tuple[int, int, int, float, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AimdLimiter(*arguments)


def test_the_settings_refuse_bounds_out_of_order() -> None:
    with pytest.raises(ValueError, match=r"min_limit <= initial_limit <= max_limit, got 2, 8, 4"):
        AdmissionSettings(min_limit=2, initial_limit=8, max_limit=4)
    with pytest.raises(ValueError, match=r"must be an integer in 1..100, got 0"):
        AdmissionSettings(slow_percent=0)


def test_the_composition_root_builds_the_limiter_from_the_settings_and_none_for_the_ablation() -> None:
    from orchestrator.composition import admission

    settings = Settings(admission=AdmissionSettings(initial_limit=3, min_limit=1, max_limit=5, slow_percent=25))
    limits = admission(settings, Ablations())
    assert isinstance(limits, AimdLimiter)
    assert (limits.limit, limits.min_limit, limits.max_limit) == (3, 1, 5)
    assert limits.slow_s == pytest.approx(0.25 * (100 - 20) / 1000)  # a share of the real-time budget
    assert isinstance(admission(Settings(), Ablations(admission_enabled=False)), Unlimited)
