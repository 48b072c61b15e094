"""The fallback chain: what answers when the real-time path cannot, as a value given to the recommender.

An ordered list of fallbacks, each with the error types it catches (as redis-py's ``Retry`` is given its
backoff and its supported errors). A request whose real-time path failed with an error is answered by the
first fallback that catches that error and has a list for the user; a fallback whose own read fails with
an error it catches passes the request on to the next one. An error that no fallback declares is a bug:
it propagates, it is never papered over with a list.

The composition root (``orchestrator/composition.py``) builds the chain: pre-computed, then popular.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator import metrics, schema
from orchestrator.errors import LoopLate, NoFallbackAnswer, Overloaded, Shed, UnknownUser
from orchestrator.popular import PopularLists
from orchestrator.ranking import RankerUnavailable
from orchestrator.store import FeatureStore, PrecomputedStore
from orchestrator.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

# Why a request was answered by a fallback (``fallback_reason`` and the fallbacks metric's label), by the
# error that sent it there; the first entry the error is an instance of names it (so a subclass comes first).
# shed: every computation slot was taken (orchestrator/admission.py); loop_late: a read or the ranking missed
# its deadline while the event loop ran late (this process's backlog, not the dependency); overload: the
# cache lookup alone ate the budget, or the loop ran late before computing (the ablation without admission);
# deadline: the computation missed its deadline while the loop was on time; *_unavailable: a dependency
# did not answer (down, refused, or a shard slow on its own).
REASONS: tuple[tuple[type[Exception], str], ...] = (
    (Shed, "shed"),
    (LoopLate, "loop_late"),
    (Overloaded, "overload"),
    (UnknownUser, "unknown_user"),
    (TimeoutError, "deadline"),
    (RankerUnavailable, "ranker_unavailable"),
    (StoreUnavailable, "store_unavailable"),
)


def reason_for(error: BaseException | type[BaseException]) -> str:
    """The reason an error (or error type) gives a fallback answer; ValueError for one without a reason."""
    error_type = error if isinstance(error, type) else type(error)
    for known, reason in REASONS:
        if issubclass(error_type, known):
            return reason
    raise ValueError(
        f"expected an error type with a fallback reason ({[known.__name__ for known, _ in REASONS]}), "
        f"but found {error_type.__name__}; add it to REASONS in orchestrator/fallback.py"
    )


class Stages(Protocol):
    """Where a fallback times its work (the recommender's per-stage timer: debug timings, stage metrics)."""

    def stage(self, name: str) -> AbstractContextManager[None]: ...


@dataclass
class FallbackRequest:
    user_id: str
    deadline: float  # time.perf_counter() by which the answer is due
    timer: Stages
    # What the user has bought, as far as a fallback read it: the next fallback leaves those items out too.
    seen: set[str] = field(default_factory=set)
    # The pre-computed lists of the model version the request serves from (None: the fallback's own store).
    precomputed: PrecomputedStore | None = None


@dataclass(frozen=True)
class FallbackList:
    items: list[tuple[str, float]]  # the whole list (the caller cuts it to n), without what the user bought
    model_version: str


@dataclass(frozen=True)
class FallbackAnswer:
    source: str  # the fallback that answered: "precomputed", "popular"
    items: list[tuple[str, float]]
    model_version: str
    reason: str  # why the real-time path did not answer: see REASONS


class FallbackSource(Protocol):
    """One place a fallback list comes from. ``name`` is the answer's ``source``."""

    name: str

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        """The user's list, or None where this source has none for them (the next fallback answers)."""
        ...


@dataclass(frozen=True)
class Fallback:
    source: FallbackSource
    catches: tuple[type[Exception], ...]  # the failures it answers for, and those of its own it passes on


class FallbackChain:
    """Ordered fallbacks; ``catches`` is every error type some fallback answers for (the recommender catches
    those and no others)."""

    def __init__(self, fallbacks: Sequence[Fallback]) -> None:
        if not fallbacks:
            raise ValueError("a fallback chain must hold at least one fallback, but found none")
        for fallback in fallbacks:
            if not fallback.catches:
                raise ValueError(
                    f"fallback {fallback.source.name!r} must declare the errors it catches, but found none"
                )
            for error_type in fallback.catches:
                reason_for(error_type)  # every error a fallback catches says why, checked at start
        self.fallbacks = tuple(fallbacks)
        self.catches: tuple[type[Exception], ...] = tuple(
            dict.fromkeys(error_type for fallback in fallbacks for error_type in fallback.catches)
        )

    @property
    def names(self) -> list[str]:
        return [fallback.source.name for fallback in self.fallbacks]

    async def answer(self, cause: Exception, request: FallbackRequest) -> FallbackAnswer:
        """The first list of a fallback that catches ``cause``; ``cause`` itself if none declares it."""
        if not isinstance(cause, self.catches):
            raise cause
        reason = reason_for(cause)
        metrics.FALLBACKS.labels(reason).inc()
        for fallback in self.fallbacks:
            if not isinstance(cause, fallback.catches):
                continue  # not this fallback's case (the pre-computed list of an unknown user: there is none)
            try:
                found = await fallback.source.lookup(request)
            except fallback.catches as exc:
                log.debug(
                    "fallback %s failed (%s: %s); the next one answers", fallback.source.name, type(exc).__name__, exc
                )
                continue
            if found is not None:
                return FallbackAnswer(fallback.source.name, found.items, found.model_version, reason)
        raise NoFallbackAnswer(reason, self.names) from cause


class PrecomputedFallback:
    """The user's offline top-N (Redis), less what they bought since it was computed; within the deadline."""

    name = "precomputed"

    def __init__(self, precomputed: PrecomputedStore, features: FeatureStore) -> None:
        self.precomputed = precomputed
        self.features = features

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        with request.timer.stage(self.name):
            async with asyncio.timeout(max(request.deadline - time.perf_counter(), 0.0)):
                (stored,), (seen,) = await asyncio.gather(
                    (request.precomputed or self.precomputed).get_recs([request.user_id]),
                    self.features.seen([request.user_id]),
                )
        request.seen = seen or set()
        if stored is None:
            return None
        # Purchases since the list was computed must not come back.
        items = [(i, s) for i, s in zip(stored.items, stored.scores, strict=True) if i not in request.seen]
        return FallbackList(items, stored.model_version) if items else None


class PopularFallback:
    """The global popular list, held in memory: the last resort, which answers whether or not Redis does."""

    name = "popular"

    def __init__(self, popular: PopularLists) -> None:
        self.popular = popular

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        popular = self.popular.get(schema.GLOBAL_SEGMENT)
        items = [(i, s) for i, s in zip(popular.items, popular.scores, strict=True) if i not in request.seen]
        return FallbackList(items, popular.model_version)
