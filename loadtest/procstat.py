"""CPU seconds used by a process and its descendants, from /proc (Linux only).

Why: on a 2-core machine the load generator competes with the service, so requests per *server*
CPU-second is the figure that carries over to a pod with a core of its own; wall-clock throughput
mostly measures the load generator.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    return raw[raw.rfind(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            text = (task / "children").read_text().split()
            found.extend(int(child) for child in text)
    except OSError:
        pass
    return found


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of ``pid`` and every live descendant (0.0 when it is gone)."""
    total = 0.0
    pending, seen = [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        fields = _stat_fields(current)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12).
        total += (int(fields[11]) + int(fields[12])) / _TICKS_PER_S
        pending.extend(_children(current))
    return total


def parse_pids(spec: str) -> dict[str, int]:
    """``"orchestrator=12,redis=34"`` -> ``{"orchestrator": 12, "redis": 34}``."""
    pids: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if not name or not value.isdigit():
            raise ValueError(f"expected NAME=PID in LOADTEST_CPU_PIDS, got {part!r}")
        pids[name] = int(value)
    return pids
