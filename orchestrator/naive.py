"""The naive store access the benchmarks compare against: one Redis command per round trip, one after
another, the way the classic design fetches features. Only for ablations (``RECSERVE_ABLATION_STORE_READS``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from orchestrator.readiness import Readiness
from orchestrator.store.backend import Backend, Command, Replies


class OneByOneBackend:
    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def execute(self, commands: Sequence[Command]) -> Replies:
        values: list[Any] = []
        unavailable = np.zeros(len(commands), dtype=bool)
        down: list[str] = []
        timed_out: list[str] = []
        for i, command in enumerate(commands):
            reply = await self.inner.execute([command])
            values.append(reply.values[0])
            unavailable[i] = bool(reply.unavailable[0])
            down.extend(name for name in reply.down if name not in down)
            timed_out.extend(name for name in reply.timed_out if name not in timed_out)
        return Replies(values, unavailable, tuple(down), tuple(timed_out))

    async def control(self, command: Command) -> Any:
        return await self.inner.control(command)

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        return await self.inner.delete_matching(pattern, batch)

    async def ready(self) -> Readiness:
        return await self.inner.ready()

    async def aclose(self) -> None:
        await self.inner.aclose()
