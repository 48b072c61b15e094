"""Launch settings shared by the local stack, the benchmarks and the load test: free ports, the core
count, how an HTTP service is served (uvicorn options) and started as a process, awaited on /readyz.

The orchestrator is started as ``python -m orchestrator`` (a process, never imported here); the load
test's ceiling app is served with ``serve`` below, which uses the same uvicorn options as
``orchestrator/__main__.py`` (tests/unit/test_layering.py pins that they agree).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.artifacts import BUILD_DIR
from stack.errors import ServiceStartError, StackError
from stack.logs import current_run, open_for_start

ORCHESTRATOR_LOG = BUILD_DIR / "orchestrator.log"

# How every HTTP service of this project is served: uvloop + httptools with the server-level limits of
# orchestrator/edge.py (named, not imported), no access log (one line per request costs more than a cache
# hit does).
UVICORN_OPTIONS: dict[str, Any] = {
    "factory": True,
    "loop": "uvloop",
    "http": "orchestrator.edge:EdgeHttpProtocol",
    "access_log": False,
}


def free_port(with_bus: bool = False) -> int:
    """A free TCP port; with ``with_bus``, port + 10000 (a Redis Cluster node's bus port) is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise StackError("could not find a free port pair (port and port + 10000) for a cluster node")


def cpu_count() -> int:
    """The cores this process may run on (its affinity), not the machine's."""
    return len(os.sched_getaffinity(0))


def serve(factory: str, host: str, port: int, workers: int = 1, log_level: str = "warning") -> None:
    """Serve the FastAPI app built by ``factory`` (``module:function``) as the orchestrator is served."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(factory, host=host, port=port, workers=workers, log_level=log_level, **UVICORN_OPTIONS)


@dataclass
class HttpService:
    """A service process started by ``start_http_service`` (the orchestrator, or the load test's ceiling)."""

    process: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while it runs; else its exit code (negative: the signal that killed it)."""
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orchestrator(
    env: Mapping[str, str], port: int, log_path: Path = ORCHESTRATOR_LOG, timeout_s: float = 60.0, workers: int = 1
) -> HttpService:
    """Run ``python -m orchestrator`` with ``env`` (RECSERVE_* settings) and wait for /readyz."""
    return start_http_service("orchestrator", env, port, log_path, timeout_s, ("--workers", str(workers)))


def start_http_service(
    module: str,
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> HttpService:
    """Run ``python -m <module> --port <port>`` with ``env`` and wait until its /readyz answers 200.

    The output is appended to ``log_path`` after a dated separator line: a restart keeps the crash's log."""
    argv = [sys.executable, "-m", module, "--port", str(port), *extra_args]
    with open_for_start(log_path, f"start: python -m {module} --port {port} {' '.join(extra_args)}".rstrip()) as log:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(current_run(log_path.read_text(errors="replace"))[-20:])
            raise ServiceStartError(f"{module} exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return HttpService(process, url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    HttpService(process, url).stop()
    raise ServiceStartError(f"{module} was not ready after {timeout_s:.0f} s (log: {log_path})")
