"""Only tests marked ``integration`` may start services, so that ``pytest -m "not integration"`` needs no
Redis or Triton and starts none.

An audit hook (PEP 578) sees every process this interpreter starts, whichever launcher starts it, so the
guard needs no list of launchers that would go stale. A test without the marker that starts a service
fails; so does one that uses a fixture which started a service for an earlier test (it would start it
itself under ``-m "not integration"``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SERVICE_BINARIES = frozenset({"redis-server", "tritonserver"})
MARKER = "integration"


class ServiceStartRefused(RuntimeError):
    pass


def service_in(argv: Sequence[str]) -> str | None:
    """The service ``argv`` starts: a server binary, or a Python module run with ``--port`` (how the local
    stack runs the orchestrator and any other HTTP service); None for any other command."""
    if len(argv) >= 3 and argv[1] == "-c" and Path(argv[0]).name in {"sh", "bash"}:
        try:
            argv = shlex.split(argv[2])
        except ValueError:
            return None
    if not argv:
        return None
    if Path(argv[0]).name in SERVICE_BINARIES:
        return Path(argv[0]).name
    if "--port" in argv and "-m" in argv[:-1]:
        return f"python -m {argv[argv.index('-m') + 1]}"
    return None


class ServiceGuard:
    def __init__(self) -> None:
        self.unmarked_test: str | None = None  # node id of the running test, while it lacks the marker
        self.fixtures: list[str] = []  # fixtures being set up, innermost last
        self.service_fixtures: dict[str, str] = {}  # fixture -> the service it started
        self.installed = False

    def install(self, config: pytest.Config) -> None:
        """Audit hooks cannot be removed: one per process. The pytest hooks go in as a plugin of their own,
        not in a conftest: a conftest's hooks do not see the setup of session-scoped fixtures."""
        if not self.installed:
            sys.addaudithook(self.audit)
            self.installed = True
        if not config.pluginmanager.is_registered(self):
            config.pluginmanager.register(self, "service-guard")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.begin(item.nodeid, item.get_closest_marker(MARKER) is not None, getattr(item, "fixturenames", ()))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        try:
            return (yield)
        finally:
            self.end()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Iterator[Any]:
        with self.setting_up(fixturedef.argname):
            return (yield)

    def begin(self, test: str, marked: bool, fixtures: Iterable[str]) -> None:
        """A test's setup starts (its fixture closure is ``fixtures``)."""
        self.unmarked_test = None if marked else test
        if marked:
            return
        used = sorted(set(fixtures) & self.service_fixtures.keys())
        if used:
            started = ", ".join(f"{name} (started {self.service_fixtures[name]})" for name in used)
            raise ServiceStartRefused(
                f"{test} uses service fixtures {started} but is not marked {MARKER}: "
                f"add `pytestmark = pytest.mark.{MARKER}` to its module"
            )

    def end(self) -> None:
        self.unmarked_test = None

    @contextmanager
    def setting_up(self, fixture: str) -> Iterator[None]:
        self.fixtures.append(fixture)
        try:
            yield
        finally:
            self.fixtures.pop()

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        """The audit hook: refuses a service start in an unmarked test (the exception aborts the start)."""
        if event != "subprocess.Popen":
            return
        argv = args[1]
        argv = [argv] if isinstance(argv, str | bytes | os.PathLike) else list(argv)
        service = service_in([os.fsdecode(part) for part in argv])
        if service is None:
            return
        for fixture in self.fixtures:
            self.service_fixtures.setdefault(fixture, service)
        if self.unmarked_test is not None:
            raise ServiceStartRefused(
                f"{self.unmarked_test} starts {service} but is not marked {MARKER}: "
                f"add `pytestmark = pytest.mark.{MARKER}` to its module"
            )


GUARD = ServiceGuard()
