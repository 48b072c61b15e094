"""Throw-away redis-server processes on free ports: for tests, benchmarks and ``python -m stack plan``.

Never touches a system Redis: every server gets its own port and folder, no persistence unless asked
(``appendonly``), and dies with ``stop()``, its folder deleted. The one exception is the server of ``make up``
(``keep_folder``): its data folder lies under build/ and outlives it, so that the next ``make up`` finds the
accepted events in its append-only file. Readiness is read from the server's own log line, not guessed with
sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stack.errors import RedisLaunchError
from stack.launch import free_port

READY_LINE = "Ready to accept connections"
PID_FILE = "redis-server.pid"
CONFIG_FILE = "secrets.conf"


def cluster_node_args(node_timeout_ms: int = 2000) -> tuple[str, ...]:
    return (
        "--cluster-enabled", "yes",
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-require-full-coverage", "no",
    )  # fmt: skip


CLUSTER_NODE_ARGS = cluster_node_args()


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RedisLaunchError("is not installed: run `make system-deps` (apt-get install redis-server)")
    return found


@dataclass
class RedisServer:
    port: int
    folder: Path
    process: subprocess.Popen[str]
    log: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    keep_folder: bool = False
    """``stop()`` shuts the server down cleanly and leaves its data folder (the ``make up`` server)."""

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

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: redis-server fsyncs its append-only file and exits; SIGKILL if it has not after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server could not act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def stop(self) -> None:
        if self.keep_folder:
            self.shutdown()
            return
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server(
    *extra: str,
    port: int | None = None,
    timeout_s: float = 20.0,
    appendonly: bool = False,
    folder: Path | None = None,
    keep_folder: bool = False,
    config: Sequence[str] = (),
) -> RedisServer:
    """Start redis-server on a free port; returns once it accepts connections.

    ``appendonly``: persist every write to an append-only file, fsynced once a second (``everysec``):
    a write acknowledged to a client is already in the kernel's page cache, so it survives the
    redis-server process being killed; only a machine crash can lose the last second. ``folder``: reuse a
    data folder (restart a server on its AOF); by default a fresh temporary one. ``keep_folder``: ``stop()``
    shuts down cleanly and keeps ``folder`` (which it then needs); a pid file there refuses a second
    server on the same folder while the first still runs (two servers on one AOF would corrupt it).
    ``config``: redis.conf lines for what must not appear in the process list (``requirepass <password>``,
    ``user <name> on ><password> ...``): written to a file of mode 0600 in ``folder`` and named first on the
    command line, the place redis-server reads a config file from; arguments (``extra``) are never secret.
    """
    if keep_folder and folder is None:
        raise RedisLaunchError("keep_folder needs a folder to keep: pass folder=<a path>")
    cluster = "--cluster-enabled" in extra
    port = port or free_port(with_bus=cluster)
    folder = folder or Path(tempfile.mkdtemp(prefix=f"redis-{port}-"))
    folder.mkdir(parents=True, exist_ok=True)
    owner = ("--pidfile", str(folder / PID_FILE)) if keep_folder else ()
    if keep_folder:
        _refuse_if_in_use(folder)
    persistence = ("--appendonly", "yes", "--appendfsync", "everysec") if appendonly else ("--appendonly", "no")
    # The secrets' file, created 0600 before a byte is written (never readable by others, even briefly).
    config_file = (
        (str(_write_private(folder / CONFIG_FILE, "".join(f"{line}\n" for line in config))),) if config else ()
    )
    args = [
        redis_server_binary(),
        *config_file,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(folder),
        "--save", "",
        *persistence,
        "--logfile", "",
        "--protected-mode", "no",
        *owner,
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = RedisServer(port, folder, process, keep_folder=keep_folder)
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


def _write_private(path: Path, text: str) -> Path:
    """``text`` in ``path``, readable by this user only (mode 0600 from its creation)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def _refuse_if_in_use(folder: Path) -> None:
    """A redis-server still running on ``folder`` (its pid file names a live redis-server) is an error."""
    try:
        pid = int((folder / PID_FILE).read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):  # no pid file, or its process is gone: a clean or crashed earlier run
        return
    if b"redis-server" in command:
        raise RedisLaunchError(
            f"data folder {folder} is in use by redis-server pid {pid} (from an earlier run still going): "
            f"stop that one first (kill {pid}); two servers on one append-only file would corrupt it"
        )


@dataclass
class LocalCluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def roles(self) -> dict[int, str]:
        """Port -> ``master``/``slave`` as the cluster sees it now (CLUSTER NODES on a live node)."""
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            listing = subprocess.run(
                ["redis-cli", "-p", str(node.port), "cluster", "nodes"], capture_output=True, text=True
            ).stdout
            roles: dict[int, str] = {}
            for line in listing.splitlines():
                fields = line.split()
                if len(fields) < 3:
                    continue
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                flags = fields[2].split(",")
                roles[port] = "master" if "master" in flags else "slave" if "slave" in flags else fields[2]
                if "fail" in flags or "fail?" in flags:
                    roles[port] += ",fail"
            return roles
        raise RedisLaunchError("cluster has no live node to ask")

    def masters(self) -> list[RedisServer]:
        """Live nodes that are masters now (a killed master is not one, whatever gossip says yet)."""
        roles = self.roles()
        return [n for n in self.nodes if n.process.poll() is None and roles.get(n.port) == "master"]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(
    masters: int = 3, timeout_s: float = 30.0, replicas: int = 0, node_timeout_ms: int = 2000
) -> LocalCluster:
    """A Redis Cluster of ``masters`` primaries with ``replicas`` replicas each, all 16384 slots assigned.

    ``node_timeout_ms`` is how long a master must be unreachable before its replica may take over."""
    if masters < 3:
        raise RedisLaunchError(f"cluster needs at least 3 masters, got {masters}")
    if replicas < 0:
        raise RedisLaunchError(f"cluster replicas must be >= 0, got {replicas}")
    args = cluster_node_args(node_timeout_ms)
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters * (1 + replicas)):
            # Partial coverage: when a master dies, the others keep serving their slots (the data plane
            # falls back per key) instead of the whole cluster refusing reads.
            nodes.append(start_server(*args))
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(n.address for n in nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if create.returncode != 0:
            raise RedisLaunchError("cluster create failed", create.stdout[-2000:] + create.stderr[-2000:])
        _wait_cluster_ok(nodes, timeout_s)
        cluster = LocalCluster(nodes)
        if replicas:
            _wait_replicas_synced(cluster, masters * replicas, timeout_s)
        return cluster
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


def _wait_replicas_synced(cluster: LocalCluster, expected: int, timeout_s: float) -> None:
    # A replica that has not finished its first sync cannot take over: poll until all report it.
    deadline = time.monotonic() + timeout_s
    while True:
        synced = 0
        for node in cluster.nodes:
            info = subprocess.run(
                ["redis-cli", "-p", str(node.port), "info", "replication"], capture_output=True, text=True
            ).stdout
            synced += "role:slave" in info and "master_link_status:up" in info
        if synced >= expected:
            return
        if time.monotonic() > deadline:
            raise RedisLaunchError(f"only {synced} of {expected} replicas in sync after {timeout_s} s")
        threading.Event().wait(0.05)
