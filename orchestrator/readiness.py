"""What a part of the service says about itself to ``/readyz``: every seam that holds a resource (a store
backend, a ranker, a retriever) answers ``ready()`` with one of these, so the probe asks each part the same
question instead of telling the backends apart."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Readiness:
    """``ok``: the part can serve now. ``state``: what ``/readyz`` shows for it, "ok" or "ok (detail)" when
    ready, else why not ("unreachable (triton, circuit open)")."""

    ok: bool
    state: str
