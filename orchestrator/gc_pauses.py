"""Garbage-collection pauses as a metric: a full collection stops the event loop, and every request in
flight waits it out, so a p99 spike with no slow dependency is often one (start-up measured 53 ms before
``gc.freeze``: docs/RELIABILITY.md, "A fresh process")."""

from __future__ import annotations

import gc
import time
from typing import Any

from orchestrator import metrics

_started: dict[int, float] = {}


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    generation = int(info["generation"])
    if phase == "start":
        _started[generation] = time.perf_counter()
    elif (started := _started.pop(generation, None)) is not None:
        metrics.GC_PAUSE.labels(str(generation)).observe(time.perf_counter() - started)


def install() -> None:
    """Observe every collection from now on (idempotent)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def uninstall() -> None:
    if _on_collection in gc.callbacks:
        gc.callbacks.remove(_on_collection)
