"""Errors of the local stack. Each states what was expected, what was found, and the fix."""

from __future__ import annotations

from pathlib import Path


class StackError(Exception):
    """Base class: everything the local stack raises on purpose."""


class RedisLaunchError(StackError):
    def __init__(self, what: str, log_tail: str = "") -> None:
        super().__init__(f"redis-server {what}" + (f"\n--- last lines of its log ---\n{log_tail}" if log_tail else ""))


class TritonLaunchError(StackError):
    def __init__(self, what: str, log_path: Path | None, log_tail: str = "") -> None:
        msg = f"tritonserver {what}"
        if log_path is not None:
            msg += f" (log: {log_path})"
        if log_tail:
            msg += f"\n--- last lines of the log ---\n{log_tail}"
        super().__init__(msg)


class ServiceStartError(StackError):
    """An HTTP service process (the orchestrator, the load test's ceiling app) that did not become ready."""


class StackEnvError(StackError):
    """A ``build/stack.env`` that cannot be written or read as ``KEY=value`` lines."""

    def __init__(self, path: Path, line: int | None, expected: str, found: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: expected {expected}, but found {found}")


class StackNotRunning(StackError):
    """No running local stack where ``build/stack.env`` says (or no such file)."""

    def __init__(self, path: Path, found: str) -> None:
        super().__init__(
            f"expected a running local stack described by {path}, but found {found}: start one with `make up`"
        )
