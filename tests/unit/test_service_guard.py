"""The guard that keeps services out of the tests not marked integration (tests/service_guard.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.service_guard import ServiceGuard, ServiceStartRefused, service_in

THIS_TEST = "tests/unit/test_service_guard.py::test_this_unmarked_test_may_start_no_service"


def test_this_unmarked_test_may_start_no_service() -> None:
    # Neither command would serve anything were the guard off: the first is not installed, the second
    # names no module; the guard refuses them by what they would start, before anything runs.
    with pytest.raises(ServiceStartRefused, match=rf"{THIS_TEST} starts tritonserver but is not marked integration"):
        subprocess.Popen(["/nowhere/bin/tritonserver", "--help"])
    with pytest.raises(ServiceStartRefused, match="starts python -m no_such_module but is not marked integration"):
        subprocess.Popen([sys.executable, "-m", "no_such_module", "--port", "0"])
    assert subprocess.run([sys.executable, "-c", "pass"], check=True).returncode == 0  # other commands run


@pytest.mark.parametrize(
    ("argv", "service"),
    [
        (["/usr/bin/redis-server", "--port", "7001"], "redis-server"),
        (["/venv/lib/tritonserver/bin/tritonserver", "--model-repository=/m"], "tritonserver"),
        (["/venv/bin/python", "-m", "orchestrator", "--port", "8000", "--workers", "1"], "python -m orchestrator"),
        (["/bin/sh", "-c", "redis-server --port 7002 &"], "redis-server"),
        (["redis-cli", "-p", "7001", "FLUSHALL"], None),
        (["/venv/bin/python", "-m", "locust", "--headless", "--host", "http://127.0.0.1:8000"], None),
        (["kubectl", "kustomize", "k8s/overlays/cpu-dev"], None),
    ],
)
def test_services_are_told_from_other_commands(argv: list[str], service: str | None) -> None:
    assert service_in(argv) == service


def test_a_fixture_that_started_a_service_is_refused_to_unmarked_tests_that_reuse_it() -> None:
    guard = ServiceGuard()  # a private one: calling its audit directly starts nothing
    guard.begin("t.py::first", marked=True, fixtures=["exported", "stack"])
    with guard.setting_up("stack"):
        guard.audit("subprocess.Popen", ("redis-server", ["redis-server", "--port", "7003"], None, None))
    guard.end()
    with pytest.raises(
        ServiceStartRefused,
        match=r"t.py::second uses service fixtures stack \(started redis-server\) but is not marked integration",
    ):
        guard.begin("t.py::second", marked=False, fixtures=["exported", "stack"])
    guard.begin("t.py::third", marked=False, fixtures=["exported"])  # training alone is no service
    guard.end()
