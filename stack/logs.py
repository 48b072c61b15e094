"""Service logs of the local stack: appended, never overwritten, one dated separator line per start.

A crashed process's log is what says why it crashed: the next start must not write over it. Each start
appends a separator, so the lines of one run are those after the last separator (``current_run``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

SEPARATOR = "===== "


def _now() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def open_for_start(path: Path, what: str) -> BinaryIO:
    """``path`` opened for appending (a child process given it writes after what is there), after a
    separator line: ``===== <local date and time> <what> =====``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("ab")
    log.write(f"{SEPARATOR}{_now()} {what} =====\n".encode())
    log.flush()
    return log


def append_line(path: Path, text: str) -> None:
    """One dated line of the supervisor's own (why it restarts a service, why it gave up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        log.write(f"{SEPARATOR}{_now()} {text}\n")


def current_run(text: str) -> list[str]:
    """The lines of the last run in a log's ``text``: those after its last start separator."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(SEPARATOR) and line.endswith(" =====")]
    return lines[starts[-1] + 1 :] if starts else lines
