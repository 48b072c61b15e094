"""The local stack (``make up`` = ``python -m stack up``): everything on one machine, real processes.

1. train + export + index when the artifacts are missing (synthetic data by default);
2. Redis at $REDIS_URL, else a private redis-server on a free port whose data folder (``build/redis``,
   append-only file on) is kept across runs: the next ``make up`` finds the events accepted before;
3. a real Triton (cpu profile) on free ports;
4. load embeddings/features/history into Redis, pre-compute every user's top-N;
5. the orchestrator on :8080 (ranking on Triton over gRPC), restarted when it crashes (within a bound,
   ``stack/supervise.py``); ``build/stack.env`` says what runs where (``stack/env_file.py``);
then print a sample request and wait. Ctrl-C stops it all. Logs are appended, never overwritten.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from export.artifacts import BUILD_DIR, MODEL_REPOSITORY, artifacts_dir, load_bundle
from export.dataplane import default_onnx_model, load_and_precompute
from export.precompute import available_cores
from stack import env_file
from stack.api_key import sample_requests, stack_api_key
from stack.env_file import StackEnvFile
from stack.errors import StackError
from stack.launch import start_orchestrator
from stack.supervise import Ended, RestartPolicy, Supervisor

if TYPE_CHECKING:
    from stack.redis_local import RedisServer
    from stack.triton_launcher import TritonServer


@dataclass(frozen=True)
class StackPaths:
    """Where one local stack keeps its state: under build/ for ``make up``, a temporary folder in tests."""

    build_dir: Path = BUILD_DIR

    @property
    def redis_data(self) -> Path:
        """The private redis-server's data folder (its append-only file): kept across runs."""
        return self.build_dir / "redis"

    @property
    def orchestrator_log(self) -> Path:
        return self.build_dir / "orchestrator.log"

    @property
    def triton_log(self) -> Path:
        return self.build_dir / "triton" / "tritonserver.log"

    @property
    def env_file(self) -> Path:
        return self.build_dir / "stack.env"

    @property
    def lock(self) -> Path:
        return self.build_dir / "stack.lock"


@contextmanager
def exclusive(paths: StackPaths) -> Iterator[None]:
    """One ``make up`` per build folder: a second one would start a second redis-server on the same
    append-only file. The lock is the kernel's (flock): it goes with the process, however that ends."""
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise StackError(
                f"expected no other local stack on {paths.build_dir}, but pid {holder} runs one "
                f"(see {paths.env_file}): stop it first (Ctrl-C in its terminal, or kill {holder})"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        # Whatever stack.env is there now describes a run that has ended (we hold the lock).
        paths.env_file.unlink(missing_ok=True)
        yield


def start_persistent_redis(paths: StackPaths) -> RedisServer:
    """The private redis-server of ``make up``: append-only file on, its data folder kept when it stops."""
    from stack.redis_local import start_server

    return start_server(appendonly=True, folder=paths.redis_data, keep_folder=True)


def orchestrator_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The RECSERVE_* variables the orchestrator starts with: this process's environment, then ``env``."""
    merged = {**os.environ, **env}
    return {key: merged[key] for key in sorted(merged) if key.startswith("RECSERVE_")}


def stack_env_values(
    settings: Mapping[str, str],
    api_url: str,
    redis_urls: str,
    paths: StackPaths,
    triton: TritonServer | None = None,
    redis_data: Path | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What build/stack.env holds for one stack (its state is added as it changes)."""
    values = {
        env_file.PID: str(os.getpid()),
        "STACK_STARTED_AT": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
        env_file.API_URL: api_url,
        env_file.REDIS_URLS: redis_urls,
        "STACK_REDIS_DATA_DIR": str(redis_data or ""),
        env_file.TRITON_GRPC_URL: triton.grpc_url if triton else "",
        "STACK_TRITON_HTTP_URL": f"http://{triton.http_url}" if triton else "",
        "STACK_TRITON_METRICS_URL": triton.metrics_url if triton else "",
        "STACK_ORCHESTRATOR_LOG": str(paths.orchestrator_log),
        **(extra or {}),
    }
    return values | dict(settings)


def orchestrator_supervisor(
    env: Mapping[str, str], port: int, paths: StackPaths, policy: RestartPolicy, stack_env: StackEnvFile
) -> Supervisor:
    """The orchestrator of a stack, on ``port``, restarted as ``policy`` allows; each change of its state
    is written to ``stack_env``."""
    supervisor = Supervisor(
        "orchestrator",
        lambda: start_orchestrator(env, port, log_path=paths.orchestrator_log),
        policy,
        log_path=paths.orchestrator_log,
    )
    supervisor.on_state = lambda state, service: stack_env.write(
        **{
            env_file.STATE: state,
            "STACK_ORCHESTRATOR_PID": str(service.pid) if service else "",
            "STACK_ORCHESTRATOR_RESTARTS": str(supervisor.restarts),
        }
    )
    return supervisor


def ensure_artifacts(dataset: str) -> Path:
    """The dataset's bundle folder. A built-in data set (``export.pipeline.DATASETS``) with no bundle is
    trained and exported first (minutes); an own one (``python -m export all --interactions FILE --name
    NAME``) must have its bundle already. When the repository's ranker belongs to another data set or
    model version, the bundle's trained ranker is exported there again (seconds, no training)."""
    from export.interactions import check_name
    from export.pipeline import DATASETS, export_bundle, run_all

    if dataset not in DATASETS:
        check_name(dataset, "--dataset")  # it names a folder under build/artifacts: no path tricks
    bundle_path = artifacts_dir(dataset)
    legacy = bundle_path.parent  # bundles were written here before versions lived side by side in v<N>/
    if (legacy / "manifest.json").is_file() and not bundle_path.exists():
        print(f"[up] moving the bundle in {legacy} to {bundle_path} (one folder per model version)", flush=True)
        bundle_path.mkdir(parents=True)
        # The manifest marks a complete bundle: it moves last.
        for entry in sorted(legacy.iterdir(), key=lambda e: e.name == "manifest.json"):
            if entry.is_file():
                entry.rename(bundle_path / entry.name)
    onnx = MODEL_REPOSITORY / "ranker_onnx" / "1" / "model.onnx"
    manifest = bundle_path / "manifest.json"
    fresh = manifest.is_file() and onnx.is_file()
    if fresh:
        version = json.loads(manifest.read_text())["model_version"]
        onnx_manifest = onnx.parent / "manifest.json"
        fresh = onnx_manifest.is_file() and json.loads(onnx_manifest.read_text()).get("model_version") == version
    if not fresh and manifest.is_file() and (bundle_path / "ranker.pt").is_file():
        print(f"[up] the model repository holds another model: exporting {dataset}'s ranker again", flush=True)
        export_bundle(bundle_path)
    elif not fresh and dataset in DATASETS:
        print(f"[up] no exported model for {dataset}: training and exporting (takes a few minutes)", flush=True)
        run_all(dataset)
    elif not fresh:
        raise StackError(
            f"expected the bundle of the data set {dataset!r} at {bundle_path}, but found none: build it with "
            f"`python -m export all --interactions FILE --name {dataset}` (built-in data sets: {', '.join(DATASETS)})"
        )
    return bundle_path


def run(
    dataset: str,
    port: int,
    use_triton: bool = True,
    policy: RestartPolicy | None = None,
    paths: StackPaths | None = None,
) -> int:
    """Start the stack and supervise it until Ctrl-C/SIGTERM (0) or until the orchestrator crashed more
    often than ``policy`` allows (1; everything is stopped cleanly either way)."""
    from export.model_repository import render_profile_repository
    from stack.triton_launcher import TritonServer

    policy = policy or RestartPolicy()
    paths = paths or StackPaths()
    with ExitStack() as stack:
        stack.enter_context(exclusive(paths))
        bundle_path = ensure_artifacts(dataset)
        bundle = load_bundle(bundle_path)
        onnx_path = default_onnx_model(bundle.manifest)
        stack_env = StackEnvFile(paths.env_file)
        stop_reason = "stopped"
        stack.callback(lambda: stack_env.mark_stopped(stop_reason))  # runs last but one: after every part stopped
        redis_url = os.environ.get("REDIS_URL")
        redis_data: Path | None = None
        if redis_url:
            print(f"[up] using Redis at {redis_url}", flush=True)
        else:
            # AOF in a folder kept across runs: accepted events (the `events` stream) survive a crash of
            # anything, a restart of the private Redis and the next `make up`.
            server = start_persistent_redis(paths)
            stack.callback(server.stop)
            redis_url, redis_data = server.url, server.folder
            print(f"[up] started a private redis-server at {redis_url} (data kept in {redis_data})", flush=True)
        # Writes need a key: the operator's RECSERVE_EVENTS_API_KEYS, else one made for this stack; it goes
        # to the orchestrator's environment and so to build/stack.env (mode 0600), never to a command line.
        api_key = stack_api_key(os.environ)
        env = {
            "RECSERVE_REDIS_URLS": redis_url,
            # {version}: the active model version's number, so the orchestrator finds the index and the ranker
            # of each version `python -m export publish` switches to (build/artifacts/<dataset>/v<N>).
            "RECSERVE_INDEX_PATH": str(bundle_path.parent / "v{version}" / "item_index.faiss"),
            "RECSERVE_ONNX_MODEL_PATH": str(MODEL_REPOSITORY / "ranker_onnx" / "{version}" / "model.onnx"),
            **api_key.settings,
        }
        served_repository = ""
        triton: TritonServer | None = None
        if use_triton:
            # Model control and the repository/shared-memory APIs stay closed to anyone without this key.
            admin_key = secrets.token_urlsafe(16)
            rendered = render_profile_repository("cpu", embedding_dim=bundle.dim)
            served_repository = str(rendered)
            triton = TritonServer(
                rendered,
                log_path=paths.triton_log,
                admin_key=admin_key,
                # Triton serves every version folder of its repository and looks for new ones every 2 s:
                # `python -m export publish` adds a version's folder there (docs/RELEASES.md).
                extra_args=("--model-control-mode=poll", "--repository-poll-secs=2"),
            )
            triton.start()
            stack.callback(triton.stop)
            env["RECSERVE_TRITON_URL"] = triton.grpc_url
            print(f"[up] Triton ready: gRPC {triton.grpc_url} (log {triton.log_path})", flush=True)
        print("[up] loading the store and pre-computing recommendations", flush=True)
        # One pre-compute process per core: nothing else runs yet, and at the scale profile's 1M users a single
        # process would take the better part of an hour.
        asyncio.run(load_and_precompute(redis_url, bundle, onnx_path, processes=available_cores()))
        api_url = f"http://127.0.0.1:{port}"
        stack_env.values = stack_env_values(
            orchestrator_settings(env),
            api_url,
            redis_url,
            paths,
            triton,
            redis_data,
            {
                "STACK_DATASET": dataset,
                "STACK_MODEL_VERSION": bundle.model_version,
                "STACK_TRITON_REPOSITORY": served_repository,
            },
        )
        supervisor = orchestrator_supervisor(env, port, paths, policy, stack_env)
        orchestrator = supervisor.start()
        stack.callback(supervisor.stop)
        user = bundle.user_ids[0]
        sample = f"{orchestrator.url}/v1/recommendations/{user}?n=5&page_type=home&device=web&debug=true"
        with urllib.request.urlopen(sample, timeout=5) as response:
            answer = response.read().decode()
        print(
            f"[up] orchestrator ready on {orchestrator.url} (model {bundle.model_version}; "
            f"log {paths.orchestrator_log}; restarted on a crash, {policy.describe()})"
        )
        print(f"[up] try:  curl '{sample}'")
        print(f"[up] ->    {answer}")
        origin = "generated for this stack" if api_key.generated else "from RECSERVE_EVENTS_API_KEYS"
        print(f"[up] writes need the API key ({origin}; also in {paths.env_file}):")
        for line in sample_requests(orchestrator.url, api_key.key, user, bundle.item_ids[0]):
            print(f"[up]       {line}")
        print(f"[up] settings and addresses: {paths.env_file} (set -a; . {paths.env_file}; set +a)")
        print("[up] Ctrl-C stops everything", flush=True)
        stop = threading.Event()

        def request_stop(*_: object) -> None:
            nonlocal stop_reason
            stop_reason = "SIGTERM"
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        ended: Ended | None = None
        try:
            ended = supervisor.watch(stop.wait)
        except KeyboardInterrupt:
            stop_reason = "Ctrl-C"
        if ended is not None:
            stop_reason = ended.reason
            print(f"[up] the orchestrator's log: {paths.orchestrator_log}", flush=True)
        print("\n[up] stopping (Redis data kept)" if redis_data else "\n[up] stopping", flush=True)
    return 1 if ended is not None and ended.failed else 0
