"""The local stack (``make up`` = ``python -m export up``): everything on one machine, real processes.

1. train + export + index when the artifacts are missing (synthetic data by default);
2. Redis at $REDIS_URL, else a private redis-server on a free port;
3. a real Triton (cpu profile) on free ports;
4. load embeddings/features/history into Redis, pre-compute every user's top-N;
5. the orchestrator on :8080 (ranking on Triton over gRPC);
then print a sample request and wait. Ctrl-C stops it all.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from export.artifacts import BUILD_DIR, MODEL_REPOSITORY, Bundle, artifacts_dir, load_bundle
from export.errors import ExportError
from orchestrator.store.backend import Backend

ORCHESTRATOR_LOG = BUILD_DIR / "orchestrator.log"


class StackError(ExportError):
    pass


def ensure_artifacts(dataset: str) -> Path:
    from export.pipeline import run_all

    bundle_path = artifacts_dir(dataset)
    onnx = MODEL_REPOSITORY / "ranker_onnx" / "1" / "model.onnx"
    manifest = bundle_path / "manifest.json"
    fresh = manifest.is_file() and onnx.is_file()
    if fresh:
        version = json.loads(manifest.read_text())["model_version"]
        onnx_manifest = onnx.parent / "manifest.json"
        fresh = onnx_manifest.is_file() and json.loads(onnx_manifest.read_text()).get("model_version") == version
    if not fresh:
        print(f"[up] no exported model for {dataset}: training and exporting (takes a few minutes)", flush=True)
        run_all(dataset)
    return bundle_path


async def load_and_precompute(
    redis: str | Sequence[str] | Backend, bundle: Bundle, onnx_path: Path, progress: bool = True
) -> None:
    """Load the bundle into Redis (activating its version) and pre-compute every user's list.

    ``redis``: one URL, several URLs (shards of one hash ring, as the orchestrator's RECSERVE_REDIS_URLS
    lists them), or a backend the caller owns (a Redis Cluster, say); a backend is not closed here."""
    from export.load import LoadConfig, load
    from export.precompute import PrecomputeConfig, precompute
    from orchestrator.ranking.onnx_ranker import OnnxRanker
    from orchestrator.retrieval import FaissRetriever
    from orchestrator.store.sharded import ShardedBackend

    owned = isinstance(redis, Sequence)  # a str is a Sequence too
    if isinstance(redis, str):
        backend: Backend = ShardedBackend.from_urls([redis], timeout_ms=5000)
    elif isinstance(redis, Sequence):
        backend = ShardedBackend.from_urls(list(redis), timeout_ms=5000)
    else:
        backend = redis
    try:
        await load(backend, bundle, LoadConfig(progress=progress))
        retriever = FaissRetriever(bundle.path / "item_index.faiss")
        ranker = OnnxRanker(onnx_path, bundle.model_version, intra_op_threads=os.cpu_count() or 1)
        await precompute(backend, bundle, retriever, ranker, PrecomputeConfig(), progress=progress)
    finally:
        if owned:
            await backend.aclose()


@dataclass
class Orchestrator:
    """A service process started by ``start_http_service`` (the orchestrator, or the load test's ceiling)."""

    process: subprocess.Popen[bytes]
    url: str

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
) -> Orchestrator:
    """Run ``python -m orchestrator`` with ``env`` (RECSERVE_* settings) and wait for /readyz."""
    return start_http_service("orchestrator", env, port, log_path, timeout_s, ("--workers", str(workers)))


def start_http_service(
    module: str,
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> Orchestrator:
    """Run ``python -m <module> --port <port>`` with ``env`` and wait until its /readyz answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port), *extra_args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise StackError(f"{module} exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return Orchestrator(process, url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    Orchestrator(process, url).stop()
    raise StackError(f"{module} was not ready after {timeout_s:.0f} s (log: {log_path})")


def run(dataset: str, port: int, use_triton: bool = True) -> int:
    from export.model_repository import render_profile_repository
    from export.redis_local import start_server
    from export.triton_launcher import TritonServer

    bundle_path = ensure_artifacts(dataset)
    bundle = load_bundle(bundle_path)
    onnx_path = MODEL_REPOSITORY / "ranker_onnx" / str(bundle.manifest.get("triton_version", 1)) / "model.onnx"
    with ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL")
        if redis_url:
            print(f"[up] using Redis at {redis_url}", flush=True)
        else:
            # AOF: accepted events (the `events` stream) survive a restart of the private Redis.
            server = start_server(appendonly=True)
            stack.callback(server.stop)
            redis_url = server.url
            print(f"[up] started a private redis-server at {redis_url} (AOF in {server.folder})", flush=True)
        env = {
            "RECSERVE_REDIS_URLS": redis_url,
            "RECSERVE_INDEX_PATH": str(bundle_path / "item_index.faiss"),
            "RECSERVE_ONNX_MODEL_PATH": str(onnx_path),
        }
        if use_triton:
            # Model control and the repository/shared-memory APIs stay closed to anyone without this key.
            admin_key = secrets.token_urlsafe(16)
            triton = TritonServer(render_profile_repository("cpu", embedding_dim=bundle.dim), admin_key=admin_key)
            triton.start()
            stack.callback(triton.stop)
            env["RECSERVE_TRITON_URL"] = triton.grpc_url
            print(f"[up] Triton ready: gRPC {triton.grpc_url} (log {triton.log_path})", flush=True)
        print("[up] loading the store and pre-computing recommendations", flush=True)
        asyncio.run(load_and_precompute(redis_url, bundle, onnx_path))
        orchestrator = start_orchestrator(env, port)
        stack.callback(orchestrator.stop)
        user = bundle.user_ids[0]
        sample = f"{orchestrator.url}/v1/recommendations/{user}?n=5&page_type=home&device=web&debug=true"
        with urllib.request.urlopen(sample, timeout=5) as response:
            answer = response.read().decode()
        print(f"[up] orchestrator ready on {orchestrator.url} (model {bundle.model_version}; log {ORCHESTRATOR_LOG})")
        print(f"[up] try:  curl '{sample}'")
        print(f"[up] ->    {answer}")
        print("[up] Ctrl-C stops everything", flush=True)
        stopped = False

        def request_stop(*_: object) -> None:
            nonlocal stopped
            stopped = True

        signal.signal(signal.SIGTERM, request_stop)
        try:
            while not stopped and orchestrator.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        if orchestrator.process.poll() not in (None, 0) and not stopped:
            print(f"[up] the orchestrator exited with code {orchestrator.process.returncode}; see {ORCHESTRATOR_LOG}")
        print("\n[up] stopping", flush=True)
    return 0
