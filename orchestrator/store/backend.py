"""The topology seam under every store: run commands grouped per shard/node, one round trip per group,
all groups concurrently, each under a deadline.

The stores (embeddings, features, precomputed) are written once against ``Backend``; ``sharded.py``
(standalone servers + hash ring) and ``cluster.py`` (Redis Cluster) differ only in how they group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
from redis import exceptions as redis_errors

from orchestrator.store.errors import StoreUnavailable


class Command(NamedTuple):
    name: str  # GET, SET, SADD, ...
    key: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Replies:
    """One reply per command, in command order; a command whose group did not answer has None and is
    flagged in ``unavailable``."""

    values: list[Any]
    unavailable: np.ndarray  # bool [len(commands)]
    down: tuple[str, ...]

    def raise_if_down(self, operation: str) -> None:
        if self.down:
            raise StoreUnavailable(operation, self.down)


class Backend(Protocol):
    async def execute(self, commands: Sequence[Command]) -> Replies: ...

    async def control(self, command: Command) -> Any:
        """Run on the node that owns control keys (version pointer, checkpoints); raises if down."""
        ...

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        """SCAN (never KEYS) every node for ``pattern`` and UNLINK what matches; for background jobs."""
        ...

    async def aclose(self) -> None: ...


# What "the shard did not answer" looks like; anything else (WRONGTYPE, a bug) propagates.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
    TimeoutError,
    OSError,
)


async def gather_groups(
    groups: dict[str, list[int]],
    n_commands: int,
    run_group: Callable[[str, list[int]], Awaitable[list[Any]]],
    timeout_s: float,
) -> Replies:
    """Run each group under its own deadline; a group that fails to answer marks its commands
    unavailable. Waits for every group, so no task outlives the call."""

    async def guarded(name: str, indices: list[int]) -> list[Any] | _Down:
        try:
            async with asyncio.timeout(timeout_s):
                return await run_group(name, indices)
        except UNAVAILABLE_ERRORS as exc:
            return _Down(exc)

    names = list(groups)
    # return_exceptions: a bug in one group must not leave the others running unobserved.
    outcomes = await asyncio.gather(*(guarded(name, groups[name]) for name in names), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    values: list[Any] = [None] * n_commands
    unavailable = np.zeros(n_commands, dtype=bool)
    down: list[str] = []
    for name, outcome in zip(names, outcomes, strict=True):
        indices = groups[name]
        if isinstance(outcome, _Down):
            unavailable[indices] = True
            down.append(name)
            continue
        assert not isinstance(outcome, BaseException)
        if len(outcome) != len(indices):
            raise RuntimeError(f"{name} returned {len(outcome)} replies for {len(indices)} commands")
        for i, value in zip(indices, outcome, strict=True):
            values[i] = value
    return Replies(values, unavailable, tuple(down))


@dataclass(frozen=True)
class _Down:
    error: BaseException
