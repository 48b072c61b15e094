"""The fallback chain: what answers when the real-time path cannot, as a value given to the recommender.

An ordered list of fallbacks, each with the error types it catches (as redis-py's ``Retry`` is given its
backoff and its supported errors). A request whose real-time path failed with an error is answered by the
first fallback that catches that error and has a list for the user; a fallback whose own read fails with
an error it catches passes the request on to the next one. An error that no fallback declares is a bug:
it propagates, it is never papered over with a list.

The composition root (``orchestrator/composition.py``) builds the chain: pre-computed, then (for a user the
model does not know) items like those of their session, then popular. The lists follow the user: the
popular list is the user's segment's, from their feature row as the request or the pre-computed fallback
read it (the global list when nothing says which).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from orchestrator import metrics, schema
from orchestrator.errors import LoopLate, NoFallbackAnswer, Overloaded, Shed, UnknownUser, UserRead
from orchestrator.popular import PopularLists
from orchestrator.ranking import RankerUnavailable
from orchestrator.retrieval import Retriever
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
    # The user's popular segment, as far as the request or a fallback read their feature row.
    segment: str = schema.GLOBAL_SEGMENT
    # What the real-time path read before it gave up on an unknown user (None: nothing, or a known user).
    read: UserRead | None = None
    # The parts of the model version the request serves from (None: the fallback's own).
    features: FeatureStore | None = None
    retriever: Retriever | None = None
    model_version: str = ""

    def __post_init__(self) -> None:
        if self.read is not None:
            self.segment = self.read.segment
            self.seen = set(self.read.seen)


@dataclass(frozen=True)
class FallbackList:
    items: list[tuple[str, float]]  # the whole list (the caller cuts it to n), without what the user bought
    model_version: str
    segment: str | None = None  # the popular list's segment


@dataclass(frozen=True)
class FallbackAnswer:
    source: str  # the fallback that answered: "precomputed", "session", "popular"
    items: list[tuple[str, float]]
    model_version: str
    reason: str  # why the real-time path did not answer: see REASONS
    segment: str | None = None  # which popular list answered (source "popular")


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
                return FallbackAnswer(fallback.source.name, found.items, found.model_version, reason, found.segment)
        raise NoFallbackAnswer(reason, self.names) from cause


class PrecomputedFallback:
    """The user's offline top-N (Redis), less what they bought since it was computed; within the deadline.
    Their feature row travels in the same round trip (the same shard: the keys share the user's hash tag),
    so that the popular list after it, if it comes to that, is their segment's."""

    name = "precomputed"

    def __init__(self, precomputed: PrecomputedStore, features: FeatureStore) -> None:
        self.precomputed = precomputed
        self.features = features

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        with request.timer.stage(self.name):
            async with asyncio.timeout(max(request.deadline - time.perf_counter(), 0.0)):
                (stored,), (seen,), rows = await asyncio.gather(
                    (request.precomputed or self.precomputed).get_recs([request.user_id]),
                    self.features.seen([request.user_id]),
                    (request.features or self.features).get_rows("user", [request.user_id]),
                )
        request.seen = seen or set()
        if rows.found[0]:
            request.segment = schema.user_segment(int(rows.matrix[0, 0]))  # the first user feature: age_bucket
        if stored is None:
            return None
        # Purchases since the list was computed must not come back.
        items = [(i, s) for i, s in zip(stored.items, stored.scores, strict=True) if i not in request.seen]
        return FallbackList(items, stored.model_version) if items else None


class SessionFallback:
    """A user the model does not know, who did something in this session: the items nearest to what they
    touched (their session vector alone, orchestrator/session.py), by retrieval score, without what they
    touched or bought. No Redis read: the real-time path read the session before it found no embedding
    (``UserRead``), and the search is in process; without a session (or an index), no list.

    Not ranked: the ranker scores a user's embedding and features against the items', and this user has
    no embedding; nearness to the session is what there is to order by."""

    name = "session"

    def __init__(self, list_length: int) -> None:
        self.list_length = list_length

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        read = request.read
        if read is None or read.session is None or request.retriever is None:
            return None
        excluded = read.touched | request.seen
        with request.timer.stage("session_retrieval"):
            query = read.session.astype(np.float32).reshape(1, -1)
            found, scores = await request.retriever.search(query, self.list_length + len(excluded))
        items = [(i, float(s)) for i, s in zip(found[0], scores[0].tolist(), strict=False) if i not in excluded]
        return FallbackList(items[: self.list_length], request.model_version) if items else None


class PopularFallback:
    """The user's segment's popular list (the global one when their segment is not known or has no list),
    held in memory: the last resort, which answers whether or not Redis does."""

    name = "popular"

    def __init__(self, popular: PopularLists) -> None:
        self.popular = popular

    async def lookup(self, request: FallbackRequest) -> FallbackList | None:
        segment, popular = self.popular.best(request.segment)
        items = [(i, s) for i, s in zip(popular.items, popular.scores, strict=True) if i not in request.seen]
        return FallbackList(items, popular.model_version, segment)
