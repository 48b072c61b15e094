"""How late the event loop runs: the overload signal for work that can wait for a better moment.

Under a burst, every await of every request is late by the loop's backlog; a computation of several
sequential awaits (reads, retrieval, ranking) then misses its deadline, its work is thrown away, and that
wasted work is what keeps the loop late for the next requests (seen in the load test: a one-second burst
turned into minutes of fallbacks). The lag tells a request before it starts computing: while the loop
runs later than ``threshold_s``, a cache miss answers from the fallback at once, the backlog drains, and
computing resumes on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from orchestrator import metrics


class LoopLagMonitor:
    """A timer every ``interval_s``; how late it fires is the loop's lag. The signal is its moving average
    over the last few samples (``smoothing``): one late timer (a garbage collection) is not overload, a
    loop that runs late sample after sample is.

    Why so few milliseconds: a computation awaits a dozen times in sequence (Redis, the single-flight task,
    Triton), and each await waits behind the loop's backlog; at a steady 5 ms of lag that alone is most of
    the real-time budget. Measured in the load test's timeline (``loop_lag_at_most`` in
    build/loadtest/<run>/steps.json): at the highest load that met the objective 1-3% of samples ran more
    than 5 ms late; once computations had started to miss their deadlines, 40-70% did.
    """

    def __init__(
        self,
        threshold_s: float,
        interval_s: float = 0.005,
        smoothing: float = 0.2,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.smoothing = smoothing
        self.clock = clock
        self.average_lag_s = 0.0

    def overloaded(self) -> bool:
        return self.average_lag_s >= self.threshold_s

    def record(self, lag_s: float) -> None:
        self.average_lag_s += self.smoothing * (lag_s - self.average_lag_s)
        metrics.LOOP_LAG.observe(lag_s)

    async def run(self) -> None:
        """Measures forever; cancel the task to stop it."""
        while True:
            started = self.clock()
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, self.clock() - started - self.interval_s))
