"""Throw-away redis-server processes on free ports: for tests, benchmarks and ``plan --measure``.

Never touches a system Redis: every server gets its own port and folder, no persistence, and dies with
``stop()``. Readiness is read from the server's own log line, not guessed with sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from export.errors import ExportError

READY_LINE = "Ready to accept connections"
CLUSTER_NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-node-timeout", "2000",
    "--cluster-require-full-coverage", "no",
)  # fmt: skip


class RedisLaunchError(ExportError):
    def __init__(self, what: str, log_tail: str = "") -> None:
        super().__init__(f"redis-server {what}" + (f"\n--- last lines of its log ---\n{log_tail}" if log_tail else ""))


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RedisLaunchError("is not installed: run `make system-deps` (apt-get install redis-server)")
    return found


def free_port(with_bus: bool = False) -> int:
    """A free TCP port; with ``with_bus``, port + 10000 (the cluster bus) is free too."""
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
    raise RedisLaunchError("could not find a free port pair for a cluster node")


@dataclass
class RedisServer:
    port: int
    folder: Path
    process: subprocess.Popen[str]
    log: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung shard)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server(*extra: str, port: int | None = None, timeout_s: float = 20.0) -> RedisServer:
    """Start redis-server on a free port with no persistence; returns once it accepts connections."""
    cluster = "--cluster-enabled" in extra
    port = port or free_port(with_bus=cluster)
    folder = Path(tempfile.mkdtemp(prefix=f"redis-{port}-"))
    args = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(folder),
        "--save", "",
        "--appendonly", "no",
        "--logfile", "",
        "--protected-mode", "no",
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = RedisServer(port, folder, process)
    ready = threading.Event()

    def drain() -> None:
        # Keep reading for the server's whole life, or a full pipe would block its logging.
        assert process.stdout is not None
        for line in process.stdout:
            server.log.append(line.rstrip())
            if READY_LINE in line:
                ready.set()
        ready.set()  # EOF: the process died; the check below reports it

    threading.Thread(target=drain, name=f"redis-{port}-log", daemon=True).start()
    if not ready.wait(timeout_s) or process.poll() is not None:
        server.stop()
        raise RedisLaunchError(f"on port {port} did not become ready", "\n".join(server.log))
    return server


@dataclass
class LocalCluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(masters: int = 3, timeout_s: float = 30.0) -> LocalCluster:
    """A Redis Cluster of ``masters`` primaries, no replicas, all 16384 slots assigned."""
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters):
            # Partial coverage: when a master dies, the others keep serving their slots (the data plane
            # falls back per key) instead of the whole cluster refusing reads.
            nodes.append(start_server(*CLUSTER_NODE_ARGS))
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(n.address for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if create.returncode != 0:
            raise RedisLaunchError("cluster create failed", create.stdout[-2000:] + create.stderr[-2000:])
        _wait_cluster_ok(nodes, timeout_s)
        return LocalCluster(nodes)
    except BaseException:
        for node in nodes:
            node.stop()
        raise


def _wait_cluster_ok(nodes: list[RedisServer], timeout_s: float) -> None:
    # Gossip has no event to wait on: poll CLUSTER INFO on every node until all report state ok.
    deadline = time.monotonic() + timeout_s
    pending = list(nodes)
    while pending:
        info = subprocess.run(
            ["redis-cli", "-p", str(pending[0].port), "cluster", "info"], capture_output=True, text=True
        ).stdout
        if "cluster_state:ok" in info:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RedisLaunchError(f"cluster node {pending[0].address} not ok after {timeout_s} s", info)
        threading.Event().wait(0.05)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
