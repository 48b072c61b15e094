"""The overload hold: which fallback answers it keeps in the local layer, for how long, and what a hit on one
says (orchestrator/overload.py, over a real LocalTTLCache with a fake clock)."""

from __future__ import annotations

import pytest

from orchestrator.cache import UNKNOWN_GENERATION, LocalTTLCache
from orchestrator.fallback import FallbackAnswer
from orchestrator.overload import HoldSlot, OverloadHold

SLOT = HoldSlot("home|web", generation=3)
ITEMS = [("5", 0.9), ("6", 0.8), ("7", 0.7)]


def answer(reason: str, items: list[tuple[str, float]] = ITEMS) -> FallbackAnswer:
    return FallbackAnswer("precomputed", items, "v-old", reason)


def hold_over(now: list[float], hold_s: float = 2.0) -> tuple[OverloadHold, LocalTTLCache]:
    local = LocalTTLCache(max_entries=10, ttl_s=60, clock=lambda: now[0])
    return OverloadHold(local, hold_s=hold_s, list_length=2), local


@pytest.mark.parametrize("reason", ["shed", "loop_late", "overload", "deadline"])
def test_an_answer_given_because_of_this_processs_load_is_held_briefly_and_says_what_it_is(reason: str) -> None:
    now = [0.0]
    hold, local = hold_over(now)
    assert hold.keep("u", SLOT, answer(reason))
    held = local.get("u", "home|web")
    assert held is not None
    assert (held.items, held.scores) == (("5", "6"), (0.9, 0.8))  # cut to the cached list length
    assert (held.source, held.fallback_reason, held.model_version, held.generation) == (
        "precomputed",
        reason,
        "v-old",
        3,
    )
    now[0] = 2.5  # past hold_s, long before the local layer's own TTL
    assert local.get("u", "home|web") is None


@pytest.mark.parametrize("reason", ["ranker_unavailable", "store_unavailable", "unknown_user"])
def test_an_answer_given_because_a_dependency_is_down_or_the_user_unknown_is_not_held(reason: str) -> None:
    hold, local = hold_over([0.0])
    assert not hold.keep("u", SLOT, answer(reason))
    assert len(local) == 0


def test_nothing_is_held_when_switched_off_empty_or_without_the_users_generation() -> None:
    off, off_local = hold_over([0.0], hold_s=0.0)
    assert not off.keep("u", SLOT, answer("overload"))
    hold, local = hold_over([0.0])
    assert not hold.keep("u", SLOT, answer("overload", items=[]))
    # Redis did not say the user's generation: a list held now could outlive an event it never saw.
    assert not hold.keep("u", HoldSlot("home|web", UNKNOWN_GENERATION), answer("overload"))
    assert len(off_local) == len(local) == 0


def test_an_event_evicts_a_held_answer_and_one_from_before_the_event_is_refused() -> None:
    hold, local = hold_over([0.0])
    assert hold.keep("u", SLOT, answer("overload"))
    local.evict_user("u", generation=4)  # what an event does, here or on another replica
    assert local.get("u", "home|web") is None
    assert not hold.keep("u", SLOT, answer("overload"))  # answered at generation 3, before the event
