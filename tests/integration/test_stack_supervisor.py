"""``make up``'s supervisor on a real stack in a temporary build folder: the orchestrator SIGKILLed comes
back on its own and answers /readyz again, with the accepted event still in Redis, its log appended (the
crash's run kept) and build/stack.env saying where it runs; the Redis data folder outlives its server."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from export.dataplane import load_and_precompute
from orchestrator.store import keys
from stack import env_file
from stack.env_file import StackEnvFile, read_stack_env, running_stack_env
from stack.errors import RedisLaunchError
from stack.launch import free_port
from stack.redis_local import RedisServer
from stack.supervise import RestartPolicy
from stack.up import StackPaths, orchestrator_supervisor, stack_env_values, start_persistent_redis
from tests.conftest import API_HEADERS, Exported, Stack
from tests.faults.harness import stream_ids
from tests.redis_harness import require_redis
from tests.waiting import poll

pytestmark = pytest.mark.integration

POLICY = RestartPolicy(max_restarts=2, window_s=60.0, first_delay_s=0.1, max_delay_s=1.0)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture
def persistent_redis(exported: Exported, tmp_path: Path) -> Iterator[tuple[StackPaths, RedisServer, Path]]:
    """The ``make up`` Redis (AOF on, data folder kept) under a temporary build folder, loaded."""
    require_redis()
    paths = StackPaths(tmp_path / "build")
    server = start_persistent_redis(paths)
    try:
        onnx_path = exported.repo / "ranker_onnx" / "1" / "model.onnx"
        asyncio.run(load_and_precompute(server.url, exported.bundle, onnx_path, progress=False))
        yield paths, server, onnx_path
    finally:
        server.stop()


def test_a_killed_orchestrator_is_restarted_and_nothing_accepted_is_lost(
    exported: Exported, persistent_redis: tuple[StackPaths, RedisServer, Path]
) -> None:
    paths, redis_server, onnx_path = persistent_redis
    # A second server on the same data folder would corrupt its append-only file: refused.
    with pytest.raises(
        RedisLaunchError, match=rf"data folder .* is in use by redis-server pid {redis_server.process.pid}"
    ):
        start_persistent_redis(paths)
    env = Stack(redis_server, exported, onnx_path).env(None)
    port = free_port()
    stack_env = StackEnvFile(
        paths.env_file,
        stack_env_values(env, f"http://127.0.0.1:{port}", redis_server.url, paths, redis_data=redis_server.folder),
    )
    supervisor = orchestrator_supervisor(env, port, paths, POLICY, stack_env)
    first = supervisor.start()
    stop = threading.Event()
    watcher = threading.Thread(target=supervisor.watch, args=(stop.wait,), name="supervisor")
    watcher.start()
    try:
        event = {"user_id": exported.bundle.user_ids[0], "item_id": exported.bundle.item_ids[0], "type": "click"}
        answer = httpx.post(f"{first.url}/v1/events", json=event, headers=API_HEADERS, timeout=5)
        assert answer.status_code == 202, answer.text
        accepted = answer.json()["id"]
        assert accepted in stream_ids(redis_server.url, keys.EVENTS_STREAM)
        assert running_stack_env(paths.env_file)["STACK_ORCHESTRATOR_RESTARTS"] == "0"

        killed_pid = first.pid
        os.kill(killed_pid, signal.SIGKILL)  # a crash: no shutdown hook runs

        def back() -> bool:
            service = supervisor.service
            return service is not None and service.pid != killed_pid and ready(service.url)

        poll(back, 45, "the orchestrator restarted by the supervisor and answering /readyz", every_s=0.2)
        assert supervisor.restarts == 1
        assert supervisor.service is not None
        assert supervisor.service.url == first.url  # the same address: clients need no new one
        assert accepted in stream_ids(redis_server.url, keys.EVENTS_STREAM)

        values = running_stack_env(paths.env_file)
        assert values[env_file.API_URL] == first.url
        assert values["STACK_ORCHESTRATOR_RESTARTS"] == "1"
        assert values["STACK_ORCHESTRATOR_PID"] == str(supervisor.service.pid)
        assert values["RECSERVE_REDIS_URLS"] == redis_server.url

        log = paths.orchestrator_log.read_text()
        starts = [
            line for line in log.splitlines() if line.startswith("===== ") and "start: python -m orchestrator" in line
        ]
        assert len(starts) == 2, log[-2000:]  # both runs are in the log: the crash's run was not overwritten
        assert "the orchestrator was killed by signal 9; restart 1 of at most 2" in log
    finally:
        stop.set()
        watcher.join(timeout=10)
        supervisor.stop()
        stack_env.mark_stopped("test over")

    with pytest.raises(env_file.StackNotRunning, match="STACK_STATE=stopped"):
        running_stack_env(paths.env_file)
    assert read_stack_env(paths.env_file)[env_file.STOP_REASON] == "test over"

    # The next `make up`: a new server on the kept folder finds the accepted event in the AOF.
    redis_server.stop()
    assert (paths.redis_data / "appendonlydir").is_dir()
    again = start_persistent_redis(paths)
    try:
        assert accepted in stream_ids(again.url, keys.EVENTS_STREAM)
    finally:
        again.stop()
