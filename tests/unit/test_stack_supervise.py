"""The restart bound of ``make up`` (stack/supervise.py): which crash is restarted, after how long, and when
the supervisor gives up. Crash times are given, the supervisor's clock and pauses are fakes: no sleeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stack.errors import ServiceStartError, StackError
from stack.logs import current_run, open_for_start
from stack.supervise import Ended, RestartBudget, RestartPolicy, Supervisor

POLICY = RestartPolicy(max_restarts=3, window_s=60.0, first_delay_s=0.5, max_delay_s=1.5)


def test_delays_double_up_to_the_cap_and_the_crash_past_the_bound_gives_up() -> None:
    budget = RestartBudget(POLICY)
    decisions = [budget.after_crash(t) for t in (0.0, 1.0, 2.0, 3.0)]
    assert [(d.restart, d.delay_s, d.attempt) for d in decisions] == [
        (True, 0.5, 1),
        (True, 1.0, 2),
        (True, 1.5, 3),  # 2.0 capped at max_delay_s
        (False, 0.0, 4),
    ]
    assert decisions[-1].reason == "it crashed 4 times within 60 s (at most 3 restarts per 60 s)"


def test_crashes_older_than_the_window_no_longer_count() -> None:
    budget = RestartBudget(POLICY)
    for t in (0.0, 10.0, 20.0):
        assert budget.after_crash(t).restart
    # The crash at 0 s has left the window (60 s) by 60 s: two recent ones plus this one, within the bound.
    late = budget.after_crash(60.0)
    assert (late.restart, late.attempt, late.delay_s) == (True, 3, 1.5)
    # A service that ran a whole window since its last crash starts again from the first delay.
    quiet = budget.after_crash(200.0)
    assert (quiet.restart, quiet.attempt, quiet.delay_s) == (True, 1, 0.5)


def test_zero_restarts_gives_up_at_the_first_crash() -> None:
    decision = RestartBudget(RestartPolicy(max_restarts=0)).after_crash(5.0)
    assert not decision.restart
    assert decision.attempt == 1


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"max_restarts": -1}, r"max_restarts must be an integer >= 0, got -1"),
        ({"window_s": 0.0}, r"window_s must be > 0, got 0.0"),
        ({"first_delay_s": 20.0, "max_delay_s": 10.0}, r"first_delay_s must be in 0\.\.max_delay_s \(10.0\), got 20.0"),
    ],
)
def test_a_policy_that_breaks_a_rule_says_which(kwargs: dict[str, float], rule: str) -> None:
    with pytest.raises(StackError, match=rule):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


# -- the supervisor's loop, on fake services --------------------------------------------------------------


@dataclass
class FakeService:
    """A service that has exited with ``code`` (None: still running)."""

    code: int | None
    url: str = "http://127.0.0.1:1"
    pid: int = 1
    stopped: bool = False

    def exit_code(self) -> int | None:
        return self.code

    def stop(self) -> None:
        self.stopped = True


@dataclass
class Script:
    """What each start does, in order: a FakeService to return, or an exception to raise."""

    outcomes: list[FakeService | Exception]
    starts: int = 0
    waits: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    stop_after_waits: int = 1000

    def start(self) -> FakeService:
        outcome = self.outcomes[self.starts]
        self.starts += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return len(self.waits) >= self.stop_after_waits

    def supervisor(self, policy: RestartPolicy = POLICY, log_path: Path | None = None) -> Supervisor:
        return Supervisor(
            "orchestrator",
            self.start,
            policy,
            log_path=log_path,
            on_state=lambda state, service: self.states.append(state),
            say=self.said.append,
            clock=lambda: 0.0,  # every crash at once: only the bound stops the restarts
        )


def test_a_service_that_keeps_crashing_is_restarted_with_backoff_then_given_up_on(tmp_path: Path) -> None:
    log = tmp_path / "orchestrator.log"
    script = Script([FakeService(-9) for _ in range(4)])
    supervisor = script.supervisor(log_path=log)
    supervisor.start()
    ended = supervisor.watch(script.wait)
    assert ended == Ended(
        "the orchestrator was killed by signal 9; giving up: it crashed 4 times within 60 s "
        "(at most 3 restarts per 60 s)",
        failed=True,
    )
    assert script.starts == 4
    assert script.waits == [0.5, 1.0, 1.5]
    assert supervisor.restarts == 3
    assert script.states == ["running", "restarting", "running", "restarting", "running", "restarting", "running"]
    notes = log.read_text().splitlines()
    assert len(notes) == 4
    assert "restart 1 of at most 3 in 0.5 s" in notes[0]
    assert "giving up" in notes[-1]


def test_a_restart_that_fails_to_start_counts_as_a_crash() -> None:
    script = Script([FakeService(1), ServiceStartError("orchestrator exited with code 3"), FakeService(None)])
    script.stop_after_waits = 3  # two backoffs, then one look at the running service
    supervisor = script.supervisor()
    supervisor.start()
    assert supervisor.watch(script.wait) is None  # stopped on request
    assert script.waits == [0.5, 1.0, 0.2]
    assert supervisor.restarts == 1
    assert any("did not start" in line for line in script.said)
    assert script.states[-1] == "running"


def test_an_exit_with_code_zero_is_a_stop_not_a_crash() -> None:
    script = Script([FakeService(0)])
    supervisor = script.supervisor()
    supervisor.start()
    ended = supervisor.watch(script.wait)
    assert ended is not None
    assert not ended.failed
    assert script.starts == 1
    assert script.waits == []


def test_a_stop_during_the_backoff_starts_nothing_more() -> None:
    script = Script([FakeService(-9)], stop_after_waits=1)
    supervisor = script.supervisor()
    supervisor.start()
    assert supervisor.watch(script.wait) is None
    assert script.starts == 1
    assert script.states == ["running", "restarting"]


def test_stop_stops_the_running_service() -> None:
    running = FakeService(None)
    supervisor = Script([running]).supervisor()
    supervisor.start()
    supervisor.stop()
    assert running.stopped
    assert supervisor.service is None


# -- logs: appended with a dated separator per start ---------------------------------------------------------


def test_each_start_appends_after_a_separator_and_the_current_run_is_the_last_one(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "service.log"
    with open_for_start(log, "start: first") as out:
        out.write(b"first run\ncrashed\n")
    with open_for_start(log, "start: second") as out:
        out.write(b"second run\n")
    lines = log.read_text().splitlines()
    assert lines[1:3] == ["first run", "crashed"]
    separators = [line for line in lines if line.startswith("===== ")]
    assert len(separators) == 2
    assert separators[1].endswith(" start: second =====")
    assert current_run(log.read_text()) == ["second run"]
    assert current_run("no separator\nat all") == ["no separator", "at all"]
