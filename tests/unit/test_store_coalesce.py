"""Calls made in the same loop iteration travel as one batch; each caller gets only its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from orchestrator.readiness import Readiness
from orchestrator.store.backend import Command, Replies
from orchestrator.store.coalesce import CoalescingBackend


class RecordingBackend:
    """Answers each command with its key (or fails, or marks keys starting with "down:" unavailable)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.batches: list[list[Command]] = []
        self.error = error
        self.sent = asyncio.Event()  # a batch is in flight

    async def execute(self, commands: Sequence[Command]) -> Replies:
        self.batches.append(list(commands))
        self.sent.set()
        await asyncio.sleep(0)  # the round trip: one loop iteration in which callers may give up
        if self.error is not None:
            raise self.error
        unavailable = np.array([c.key.startswith("down:") for c in commands], dtype=bool)
        values = [None if off else c.key for c, off in zip(commands, unavailable, strict=True)]
        return Replies(values, unavailable, ("shard-b",) if unavailable.any() else ())

    async def control(self, command: Command) -> Any:
        return "PONG"

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        return 0

    async def ready(self) -> Readiness:
        return Readiness(True, "ok")

    async def aclose(self) -> None:
        return None


def gets(*keys: str) -> list[Command]:
    return [Command("GET", k) for k in keys]


async def test_calls_of_one_iteration_make_one_batch_and_each_gets_its_own_replies() -> None:
    inner = RecordingBackend()
    backend = CoalescingBackend(inner)
    calls_before, batches_before = (
        REGISTRY.get_sample_value(f"recserve_redis_calls_per_batch_{s}") for s in ("sum", "count")
    )
    a, b, c = await asyncio.gather(
        backend.execute(gets("a1", "a2")), backend.execute(gets("down:b1")), backend.execute(gets("c1"))
    )
    assert [[c.key for c in batch] for batch in inner.batches] == [["a1", "a2", "down:b1", "c1"]]
    assert (a.values, a.unavailable.tolist(), a.down) == (["a1", "a2"], [False, False], ())
    assert (b.values, b.unavailable.tolist(), b.down) == ([None], [True], ("shard-b",))
    assert (c.values, c.down) == (["c1"], ())
    assert REGISTRY.get_sample_value("recserve_redis_calls_per_batch_sum") == (calls_before or 0) + 3
    assert REGISTRY.get_sample_value("recserve_redis_calls_per_batch_count") == (batches_before or 0) + 1
    # Calls made one after another are not held back for each other.
    await backend.execute(gets("d1"))
    await backend.execute(gets("e1"))
    assert [[c.key for c in batch] for batch in inner.batches[1:]] == [["d1"], ["e1"]]


async def test_an_error_reaches_every_call_of_its_batch_and_a_caller_that_gave_up_harms_no_one() -> None:
    failing = CoalescingBackend(RecordingBackend(error=ValueError("WRONGTYPE")))
    results = await asyncio.gather(failing.execute(gets("a")), failing.execute(gets("b")), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]

    inner = RecordingBackend()
    backend = CoalescingBackend(inner)
    impatient = asyncio.ensure_future(backend.execute(gets("x")))
    patient = asyncio.ensure_future(backend.execute(gets("y")))
    await inner.sent.wait()
    impatient.cancel()  # while its batch is in flight
    assert inner.batches == [gets("x", "y")]
    assert (await patient).values == ["y"]
    with pytest.raises(asyncio.CancelledError):
        await impatient
    await backend.aclose()
