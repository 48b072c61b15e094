"""Run a real local Triton: the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel, on the
``cpu`` profile, on free ports; wait for readiness, append to a log file, shut down cleanly.

What it needs: the wheel (``pip install .[triton]``), this interpreter's Python-backend stub (the
wheel ships one per Python version) and a writable ``/dev/shm`` (the Python backend passes tensors
through shared memory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from export.artifacts import BUILD_DIR
from stack.errors import TritonLaunchError
from stack.launch import free_port
from stack.logs import current_run, open_for_start

RUNTIME_DIR = BUILD_DIR / "triton" / "runtime"
ARGV_SECRET_SOURCE = Path(__file__).with_name("argv_secret.c")
ADMIN_KEY_PLACEHOLDER = "@TRITON_ADMIN_KEY@"  # what /proc/<pid>/cmdline shows; stack/argv_secret.c fills it in
ADMIN_KEY_VARIABLE = "TRITON_ADMIN_KEY"


def argv_secret_shim(out_dir: Path = BUILD_DIR / "triton") -> Path | None:
    """``stack/argv_secret.c`` built as a shared library (again when the source is newer); None without cc."""
    shim = out_dir / "argv_secret.so"
    if shim.is_file() and shim.stat().st_mtime >= ARGV_SECRET_SOURCE.stat().st_mtime:
        return shim.resolve()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    building = shim.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(building), str(ARGV_SECRET_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise TritonLaunchError(f"building {ARGV_SECRET_SOURCE.name} failed:\n{result.stderr}", None)
    building.replace(shim)  # atomic: a concurrent start never loads a half-written library
    return shim.resolve()


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise TritonLaunchError("is not installed: pip install '.[triton]' (nvidia-pytriton)", None) from exc
    return Path(pytriton.__file__).resolve().parent


def prepare_backends(runtime_dir: Path = RUNTIME_DIR) -> tuple[Path, Path, Path]:
    """(binary, backend dir, shared-library dir). Copies the Python backend with this interpreter's stub."""
    root = _pytriton_root()
    server_dir = root / "tritonserver"
    binary = server_dir / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        raise TritonLaunchError(f"binary not found at {binary}", None)
    if not stub.is_file():
        raise TritonLaunchError(f"has no Python-backend stub for Python {version} ({stub})", None)
    backends = runtime_dir / "backends"
    python_backend = backends / "python"
    if not (python_backend / "triton_python_backend_stub").is_file():
        if backends.exists():
            shutil.rmtree(backends)
        shutil.copytree(server_dir / "backends", backends)
        shutil.copy(stub, python_backend / "triton_python_backend_stub")
    libs = root.parent / "nvidia_pytriton.libs"
    return binary, backends, libs


def check_shared_memory(path: Path = Path("/dev/shm")) -> None:
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise TritonLaunchError(
            f"needs a writable {path} for the Python backend (in a container: mount an emptyDir "
            "with medium Memory, or run docker with --shm-size)",
            None,
        )


class TritonServer:
    """Context manager around one tritonserver process."""

    def __init__(
        self,
        model_repository: Path,
        log_path: Path | None = None,
        startup_timeout_s: float = 120.0,
        admin_key: str | None = None,
        extra_args: tuple[str, ...] = (),
        ports: tuple[int, int, int] | None = None,
    ) -> None:
        """``ports``: (http, grpc, metrics) to listen on; by default free ones, chosen at each start.
        Fixed ports let a restarted server come back at the address its clients already use (what a
        Kubernetes Service gives a restarted pod)."""
        self.model_repository = Path(model_repository)
        self.log_path = log_path or BUILD_DIR / "triton" / "tritonserver.log"
        self.startup_timeout_s = startup_timeout_s
        self.admin_key = admin_key
        self.extra_args = extra_args
        self.ports = ports
        self.http_port, self.grpc_port, self.metrics_port = ports or (0, 0, 0)
        self.process: subprocess.Popen[bytes] | None = None
        self._shim: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, binary: Path, backends: Path) -> list[str]:
        args = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            # Models are fixed at start: no load/unload API for anyone on the network.
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        if self.admin_key:
            # The key itself only with no shim to hide it (no C compiler here; start() warns).
            key = ADMIN_KEY_PLACEHOLDER if self._shim is not None else self.admin_key
            restricted = f"model-repository,shared-memory,trace,logging:admin-key={key}"
            args += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        return args + list(self.extra_args)

    def start(self) -> TritonServer:
        binary, backends, libs = prepare_backends()
        check_shared_memory()
        self.http_port, self.grpc_port, self.metrics_port = self.ports or (free_port(), free_port(), free_port())
        env = os.environ.copy()
        env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(libs)
        # The stub embeds this interpreter: put its bin first so it finds this venv's packages.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        if self.admin_key:
            # The admin key travels in the environment (readable by this user only), never in the argv.
            self._shim = argv_secret_shim()
            if self._shim is None:
                print(
                    "[triton] WARNING: no C compiler (cc) to build stack/argv_secret.c: the admin key is on "
                    "tritonserver's command line, visible to every local user",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                env["LD_PRELOAD"] = f"{self._shim}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(self._shim)
                env[ADMIN_KEY_VARIABLE] = self.admin_key
        # Appended after a dated separator: a restart keeps the log of the run that crashed.
        with open_for_start(self.log_path, f"start: tritonserver (gRPC port {self.grpc_port})") as log:
            # A session of its own, so that stop() reaches the Python-backend stubs too.
            self.process = subprocess.Popen(
                self.command(binary, backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_ready()
        if self._shim is not None:  # once ready: the loader has long mapped what it preloads
            self._check_shim_loaded(self._shim)
        return self

    def _check_shim_loaded(self, shim: Path) -> None:
        """Fail closed: without the shim, the placeholder (public) would be the admin key."""
        assert self.process is not None
        try:
            mapped = str(shim) in Path(f"/proc/{self.process.pid}/maps").read_text()
        except OSError:
            mapped = False
        if not mapped:
            self.kill()
            raise TritonLaunchError(f"did not preload {shim}: its admin key would be the public placeholder", None)

    def _log_tail(self, lines: int = 5) -> str:
        """Triton's error lines (``E<date> ...``: why a model failed to load) and the last few lines, of
        this run only (the log keeps earlier runs)."""
        try:
            text = current_run(self.log_path.read_text(errors="replace"))
        except OSError:
            return ""
        errors = [line for line in text if line[:1] == "E" and line[1:5].isdigit()]
        return "\n".join([*errors, *text[-lines:]])

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonLaunchError(
                    f"exited with code {code} before becoming ready", self.log_path, self._log_tail()
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TritonLaunchError(f"was not ready after {self.startup_timeout_s:.0f} s", self.log_path, self._log_tail())

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # stubs that outlived the server
            os.killpg(pgid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL, as a crash would: for fault-injection tests."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
