"""Admission by capacity: how many real-time computations (retrieval, the candidates' Redis reads, ranking)
run at once. The flow asks ``try_acquire`` before it starts one: a permit, or None at once (the request is
answered from the fallback chain, reason ``shed``). The permit says how the computation ended; the limit
follows. It knows nothing of the flow.

The choice: AIMD on the computations' own outcome (Netflix concurrency-limits' ``AIMDLimit``, with TCP's
one backoff per congestion window), not a gradient limiter (its ``Gradient2Limit``) nor a fixed limit.

- Why adaptive: the capacity is not one number. On the 2-core development machine about 7 computations
  at once kept within the deadline (docs/BENCHMARKS.md, `no_cache`: 200 req/s at 34 ms median, p99 60 ms;
  at 300 req/s a fifth of the answers were fallbacks), on a T4 pod it is several times that, and it
  falls whenever cache hits, events or a burst take the event loop. A fixed limit measured once is wrong
  on every other machine and at every other mix of traffic (set ``min_limit = max_limit`` for one anyway).
- Why not the gradient: it reads congestion from the ratio of the recent to the long-term latency, but
  here latency rises with concurrency by design: Triton's dynamic batcher merges the requests that queue
  behind a busy instance (and on a GPU waits up to 5 ms to fill larger batches), which is how it gains
  throughput. A gradient limiter reads that as queueing and holds the limit
  low, and its long-term baseline drifts with the traffic mix (a cache flush changes it at once). What
  matters is explicit: a computation must finish within its deadline. So the signal is whether it did, with
  a margin (``slow_s``, below the budget): slower or timed out is a miss.
- How it moves: a miss multiplies the limit by ``backoff_ratio``, once per congestion window (a computation
  admitted before the last backoff does not back off again: when a stall makes every computation in flight
  miss at once, that is one signal, not ten). A computation in time that found the limit full adds
  1/limit, so about one slot per window of completions; one that did not find it full adds nothing, so a
  quiet hour does not grow a limit that a cache flush would then find far too high. Never below
  ``min_limit`` (some computations always run, so the cache refills), never above ``max_limit``.
- Failures of a dependency (a shard down, Triton down, an unknown user) move nothing: they say nothing
  about this process's capacity, and the breaker and fallbacks deal with them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from orchestrator import metrics


class Permit:
    """One admitted computation. Say how it ended exactly once: ``succeeded``, ``missed`` (past its deadline,
    or too late to count) or ``ignored`` (it ended for a reason that says nothing about capacity); a second
    call does nothing, so a ``finally: ignored()`` after the others is safe."""

    def __init__(self, release: Callable[[Permit, str], None], started: float, in_flight: int, window: int) -> None:
        self._release = release
        self.started = started
        self.in_flight = in_flight  # computations in flight when it was admitted, itself included
        self.window = window  # the limiter's backoffs so far when it was admitted
        self.done = False

    def succeeded(self) -> None:
        self._finish("succeeded")

    def missed(self) -> None:
        self._finish("missed")

    def ignored(self) -> None:
        self._finish("ignored")

    def _finish(self, outcome: str) -> None:
        if not self.done:
            self.done = True
            self._release(self, outcome)


class Admission(Protocol):
    """What the flow asks before computing: a permit, or None (shed: answer from the fallback at once)."""

    def try_acquire(self) -> Permit | None: ...


class AimdLimiter:
    """At most ``limit`` computations at once; the limit adapts as the module docstring says."""

    def __init__(
        self,
        initial_limit: int,
        min_limit: int,
        max_limit: int,
        slow_s: float,
        backoff_ratio: float = 0.9,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 1 <= min_limit <= initial_limit <= max_limit:
            raise ValueError(
                f"limits must satisfy 1 <= min_limit <= initial_limit <= max_limit, "
                f"but found {min_limit}, {initial_limit}, {max_limit}"
            )
        if not 0 < backoff_ratio <= 1:
            raise ValueError(f"backoff_ratio must be in (0, 1], but found {backoff_ratio}")
        if not slow_s > 0:
            raise ValueError(f"slow_s must be > 0, but found {slow_s}")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.slow_s = slow_s
        self.backoff_ratio = backoff_ratio
        self.clock = clock
        self._limit = float(initial_limit)
        self.in_flight = 0
        self.window = 0  # backoffs so far
        self._publish()

    @property
    def limit(self) -> int:
        return int(self._limit)

    def try_acquire(self) -> Permit | None:
        if self.in_flight >= self.limit:
            return None
        self.in_flight += 1
        self._publish()
        return Permit(self._release, self.clock(), self.in_flight, self.window)

    def _release(self, permit: Permit, outcome: str) -> None:
        self.in_flight -= 1
        late = outcome == "succeeded" and self.clock() - permit.started > self.slow_s
        if outcome == "missed" or late:
            if permit.window == self.window:  # the first miss of this window backs off; the rest are its echo
                self._limit = max(float(self.min_limit), self._limit * self.backoff_ratio)
                self.window += 1
        elif outcome == "succeeded" and permit.in_flight >= self.limit:
            self._limit = min(float(self.max_limit), self._limit + 1 / self._limit)
        self._publish()

    def _publish(self) -> None:
        metrics.COMPUTE_LIMIT.set(self.limit)
        metrics.COMPUTE_IN_FLIGHT.set(self.in_flight)


class Unlimited:
    """Admits every computation (the ablation ``RECSERVE_ABLATION_ADMISSION_ENABLED=false``: only the deadline
    bounds them, as before admission by capacity); still counts them in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        metrics.COMPUTE_LIMIT.set(math.inf)
        metrics.COMPUTE_IN_FLIGHT.set(0)

    def try_acquire(self) -> Permit:
        self.in_flight += 1
        metrics.COMPUTE_IN_FLIGHT.set(self.in_flight)
        return Permit(self._release, 0.0, self.in_flight, 0)

    def _release(self, permit: Permit, outcome: str) -> None:
        self.in_flight -= 1
        metrics.COMPUTE_IN_FLIGHT.set(self.in_flight)
