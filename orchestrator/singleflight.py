"""Single-flight: concurrent callers for one key share one computation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[T]] = {}
        self._waiting: dict[str, int] = {}  # callers waiting per key

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def running(self, key: str) -> bool:
        """Whether a computation for ``key`` is under way: a caller now would join it."""
        task = self._inflight.get(key)
        return task is not None and not task.done()

    def waiting(self, key: str) -> int:
        """Callers waiting for ``key``'s computation now."""
        return self._waiting.get(key, 0)

    def wanted(self, key: str) -> bool:
        """Whether any caller still waits for ``key``'s computation (the computation asks between its stages)."""
        return self.waiting(key) > 0

    async def do(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Result of ``work`` for ``key`` and whether this caller joined another's computation.

        The work runs as its own task: every waiter gets its result or its exception, and one waiter's
        cancellation (its own deadline) neither cancels the work for the others nor leaves it orphaned.
        A computation that has already ended is never joined (it may have stopped for want of waiters):
        a new one starts.
        """
        task = self._inflight.get(key)
        joined = task is not None and not task.done()
        if task is None or not joined:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            return await asyncio.shield(task), joined
        finally:
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]

    def _finish(self, key: str, task: asyncio.Task[T]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # marks it retrieved even if every waiter gave up first
