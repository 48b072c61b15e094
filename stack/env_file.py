"""``build/stack.env``: how other commands find the stack that ``make up`` runs.

``make up`` writes it once the API answers: the ``RECSERVE_*`` settings the orchestrator was started with
and the stack's addresses and state (``STACK_*``), one ``KEY=value`` line each, the value quoted as a POSIX
shell word. So a shell can load it (``set -a; . build/stack.env; set +a``) and Python reads it with
``read_stack_env`` (or ``running_stack_env``, which also checks that the stack is up). While the stack
restarts a part, ``STACK_STATE`` says ``restarting``; once it stops, ``stopped`` (and ``STACK_STOP_REASON``
says why).

The file may carry secrets (API keys): it is written with mode 0600, through a temporary file renamed
over the old one, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path

from export.artifacts import BUILD_DIR
from stack.errors import StackEnvError, StackNotRunning

STACK_ENV_PATH = BUILD_DIR / "stack.env"

STATE = "STACK_STATE"
"""running, restarting (a part is being restarted) or stopped."""
PID = "STACK_PID"
"""The supervisor's process id (``python -m stack up``)."""
STOP_REASON = "STACK_STOP_REASON"
API_URL = "STACK_API_URL"
REDIS_URLS = "STACK_REDIS_URLS"
TRITON_GRPC_URL = "STACK_TRITON_GRPC_URL"

RUNNING, RESTARTING, STOPPED = "running", "restarting", "stopped"
MODE = 0o600

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HEADER = (
    "# Written by `make up` (python -m stack up); it rewrites this file as the stack changes.\n"
    "# Load it in a shell with: set -a; . build/stack.env; set +a\n"
)


def format_stack_env(values: Mapping[str, str], path: Path = STACK_ENV_PATH) -> str:
    """The file's text: ``KEY=value`` lines in the order given, each value one shell word."""
    lines = [HEADER]
    for key, value in values.items():
        if not _KEY.fullmatch(key):
            raise StackEnvError(path, None, "keys that are shell variable names ([A-Za-z_][A-Za-z0-9_]*)", repr(key))
        if "\n" in value or "\r" in value or "\0" in value:
            # The value itself stays out of the message: it may be a key.
            raise StackEnvError(path, None, f"a one-line value for {key}", "a line break or NUL in it")
        lines.append(f"{key}={shlex.quote(value)}\n")
    return "".join(lines)


def write_stack_env(path: Path, values: Mapping[str, str]) -> None:
    """Replace ``path`` with ``values`` atomically (temporary file, fsync, rename), mode 0600."""
    text = format_stack_env(values, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp already creates 0600; said again because the mode is the point, whatever the umask.
        os.fchmod(fd, MODE)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_stack_env(path: Path = STACK_ENV_PATH) -> dict[str, str]:
    """Every ``KEY=value`` of the file, unquoted as a shell would. Reads it whatever ``STACK_STATE`` says
    (``running_stack_env`` checks that); a missing file raises ``StackNotRunning``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StackNotRunning(path, "no such file") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, rest = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise StackEnvError(path, number, "KEY=value", "a line without a variable name before '='")
        try:
            words = shlex.split(rest)
        except ValueError as exc:  # an unclosed quote
            raise StackEnvError(path, number, f"one shell word after {key}=", str(exc)) from None
        if len(words) > 1:
            raise StackEnvError(path, number, f"one shell word after {key}=", f"{len(words)} words")
        values[key] = words[0] if words else ""
    return values


def running_stack_env(path: Path = STACK_ENV_PATH) -> dict[str, str]:
    """``read_stack_env``, for a stack that is up: its state is ``running`` and its supervisor alive."""
    values = read_stack_env(path)
    state = values.get(STATE, "")
    if state != RUNNING:
        reason = values.get(STOP_REASON)
        raise StackNotRunning(path, f"{STATE}={state or '(unset)'}" + (f" ({reason})" if reason else ""))
    pid = values.get(PID, "")
    if not pid.isdigit() or not _alive(int(pid)):
        # The supervisor was killed before it could mark the file stopped.
        raise StackNotRunning(path, f"{PID}={pid or '(unset)'}, a process that no longer runs")
    return values


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class StackEnvFile:
    """The stack.env of one run of ``make up``: fixed values (settings, addresses) plus the changing state.
    Nothing is written until the first ``write``; ``mark_stopped`` then keeps the file, marked."""

    def __init__(self, path: Path = STACK_ENV_PATH, values: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.values: dict[str, str] = dict(values or {})
        self.written = False

    def write(self, **changes: str) -> None:
        self.values.update(changes)
        write_stack_env(self.path, self.values)
        self.written = True

    def mark_stopped(self, reason: str) -> None:
        if self.written:
            self.write(**{STATE: STOPPED, STOP_REASON: reason})
