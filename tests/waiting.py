"""Waiting for a condition in tests: poll it with a deadline, and on failure say what was waited for.

For what no event can signal to the test (another process's state, a real server's answer). Inside one
event loop, gate on an ``asyncio.Event`` instead (DESIGN style rule 10)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable


def poll(condition: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.05) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout_s``, naming ``what``."""
    started = time.monotonic()
    pause = threading.Event()  # never set: an interruptible pause between two looks
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, f"{what}: not after {timeout_s} s"
        pause.wait(every_s)
    return time.monotonic() - started


async def until(condition: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.01) -> float:
    """``poll`` without blocking the event loop: the tasks the condition depends on run meanwhile."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, f"{what}: not after {timeout_s} s"
        await asyncio.sleep(every_s)  # the pause between two looks, not a guess at how long it takes
    return time.monotonic() - started
