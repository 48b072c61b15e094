"""Keeping the orchestrator of ``make up`` running: restart it when it crashes, within a bound.

A crash (a non-zero exit, a signal such as the OOM killer's SIGKILL) is followed by a restart after an
exponential backoff; more than ``max_restarts`` crashes within ``window_s`` mean it will not come up by
itself (a bad setting, a broken model): the supervisor gives up and says why, and ``make up`` stops the
rest cleanly. An exit with code 0 is a stop someone asked for (SIGTERM, Ctrl-C), not a crash.

The bound is a value (``RestartPolicy``) and the decision a pure function of crash times
(``RestartBudget``), so tests check it without clocks or sleeps; ``Supervisor`` applies it to a process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stack.errors import ServiceStartError, StackError
from stack.logs import append_line


@dataclass(frozen=True)
class RestartPolicy:
    """How often a crashed service is restarted, and how long the supervisor waits before each restart."""

    max_restarts: int = 5
    """Restarts allowed within ``window_s``; one crash more and the supervisor gives up (0: never restart)."""
    window_s: float = 300.0
    """The sliding window the restarts are counted in: a service that ran this long since its last crash
    starts again from the first delay."""
    first_delay_s: float = 0.5
    """Wait before the first restart in a window; doubled for each further one."""
    max_delay_s: float = 10.0
    """The longest wait before a restart."""

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise StackError(f"max_restarts must be an integer >= 0, got {self.max_restarts}")
        if not self.window_s > 0:
            raise StackError(f"window_s must be > 0, got {self.window_s}")
        if not 0 <= self.first_delay_s <= self.max_delay_s:
            raise StackError(f"first_delay_s must be in 0..max_delay_s ({self.max_delay_s}), got {self.first_delay_s}")

    def describe(self) -> str:
        return f"at most {self.max_restarts} restarts per {self.window_s:g} s"


@dataclass(frozen=True)
class Decision:
    """What to do after a crash: restart after ``delay_s`` (the ``attempt``-th restart in the window), or
    give up (``restart`` false; ``reason`` says why)."""

    restart: bool
    delay_s: float
    attempt: int
    reason: str


class RestartBudget:
    """The crashes of one service in the policy's window; each new crash gets a ``Decision``."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._crashes: deque[float] = deque()

    def after_crash(self, now: float) -> Decision:
        """``now``: the crash's time on a monotonic clock, in seconds."""
        policy = self.policy
        while self._crashes and self._crashes[0] <= now - policy.window_s:
            self._crashes.popleft()
        self._crashes.append(now)
        attempt = len(self._crashes)
        if attempt > policy.max_restarts:
            return Decision(
                False,
                0.0,
                attempt,
                f"it crashed {attempt} times within {policy.window_s:g} s ({policy.describe()})",
            )
        # Doubling: a service that crashes at once is not restarted in a tight loop; capped, so that one
        # that crashed a few times still comes back soon.
        delay = min(policy.max_delay_s, policy.first_delay_s * 2 ** (attempt - 1))
        return Decision(True, delay, attempt, f"restart {attempt} of at most {policy.max_restarts}")


class Service(Protocol):
    """A started process as the supervisor sees it (``stack.launch.HttpService``)."""

    url: str

    @property
    def pid(self) -> int: ...

    def exit_code(self) -> int | None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Ended:
    """Why ``Supervisor.watch`` returned without being asked to stop. ``failed``: it gave up on crashes."""

    reason: str
    failed: bool


def describe_exit(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


class Supervisor:
    """Starts one service and restarts it when it crashes, as its ``RestartPolicy`` allows.

    ``on_state(state, service)`` hears each change: ``running`` with the live service, ``restarting``
    with None. ``wait(seconds)`` pauses (True: stop asked) and ``clock`` tells the time: injected, so tests
    run the loop without sleeping.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], Service],
        policy: RestartPolicy,
        log_path: Path | None = None,
        on_state: Callable[[str, Service | None], None] = lambda state, service: None,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._start = start
        self.budget = RestartBudget(policy)
        self.log_path = log_path
        self.on_state = on_state
        self.say = say
        self.clock = clock
        self.service: Service | None = None
        self.restarts = 0

    def start(self) -> Service:
        """The first start: a failure here raises (a service that never came up is not restarted)."""
        self.service = self._start()
        self.on_state("running", self.service)
        return self.service

    def watch(self, wait: Callable[[float], bool], poll_s: float = 0.2) -> Ended | None:
        """Watch until ``wait`` says stop (returns None) or the service ended for good (returns why)."""
        while True:
            service = self.service
            code = service.exit_code() if service is not None else None
            if service is not None and code is None:
                if wait(poll_s):
                    return None
                continue
            if code == 0:
                return Ended(f"the {self.name} exited with code 0 (stopped from outside)", failed=False)
            what = describe_exit(code) if code is not None else "did not start"
            self.service = None
            decision = self.budget.after_crash(self.clock())
            if not decision.restart:
                reason = f"the {self.name} {what}; giving up: {decision.reason}"
                self._note(reason)
                return Ended(reason, failed=True)
            self._note(f"the {self.name} {what}; {decision.reason} in {decision.delay_s:g} s")
            self.on_state("restarting", None)
            if wait(decision.delay_s):
                return None
            try:
                self.service = self._start()
            except ServiceStartError as exc:  # it crashed again before it was ready: counts as a crash
                self.say(f"[up] {exc}")
                continue
            self.restarts += 1
            self.on_state("running", self.service)
            self.say(f"[up] the {self.name} is back on {self.service.url} (restart {self.restarts})")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def _note(self, line: str) -> None:
        self.say(f"[up] {line}")
        if self.log_path is not None:
            append_line(self.log_path, f"[supervisor] {line}")
