"""The overload hold: a fallback answered because this process was overloaded is held for a moment in the
local cache layer, so that the user's next requests are hits instead of computations under the same overload.

Why: a list that failed to compute is not cached, so every later request of that user misses again and,
under the same overload, fails again; and each purchase adds a user to that set. Left alone the misses
outgrow what the process can compute and it never leaves overload, even after the burst that caused it
(load test). Held for ``hold_s``, those users are hits again until the loop has caught up; an event evicts
the held answer like any list (the local layer's eviction and generation floor apply to it as to any).

The flow asks it after every fallback answer (``keep``); it knows nothing of the flow. Beside it,
``orchestrator/loop_lag.py`` says when the process is overloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from orchestrator.cache import UNKNOWN_GENERATION, CachedList
from orchestrator.fallback import FallbackAnswer

# Fallbacks caused by this process's own load (not by a dependency being down): worth holding for a moment.
# A shed request's pre-computed list above all: held, the user's next requests are local hits (no round
# trip) until the hold ends or an event evicts it, and only then ask for a computation slot again.
HELD_REASONS = frozenset({"shed", "loop_late", "overload", "deadline"})


@dataclass(frozen=True)
class HoldSlot:
    """Where a fallback answer may be held: the request's cache key and the user's generation at lookup."""

    context_key: str
    generation: int


class LocalLayer(Protocol):
    """The in-process cache layer (``LocalTTLCache``): False where it refused an entry older than an event."""

    def set(self, user_id: str, context_key: str, value: CachedList, ttl_s: float | None = None) -> bool: ...


class OverloadHold:
    """Holds answers whose reason is in ``reasons`` for ``hold_s`` (0: never), cut to ``list_length``."""

    def __init__(
        self, local: LocalLayer, hold_s: float, list_length: int, reasons: frozenset[str] = HELD_REASONS
    ) -> None:
        self.local = local
        self.hold_s = hold_s
        self.list_length = list_length
        self.reasons = reasons

    def keep(self, user_id: str, slot: HoldSlot, answer: FallbackAnswer) -> bool:
        """Holds ``answer`` for the user's next requests in ``slot``; True if it is held."""
        if answer.reason not in self.reasons or self.hold_s <= 0 or not answer.items:
            return False
        if slot.generation == UNKNOWN_GENERATION:
            return False  # as for any cached list: without the user's generation an older list could come back
        items = answer.items[: self.list_length]
        value = CachedList(
            tuple(i for i, _ in items),
            tuple(s for _, s in items),
            answer.model_version,
            slot.generation,
            answer.source,  # a hit on it says what it is and why
            answer.reason,
            answer.segment,
        )
        return self.local.set(user_id, slot.context_key, value, self.hold_s)
