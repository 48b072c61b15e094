"""The local stack (``make up`` = ``python -m stack up``): everything on one machine, real processes.

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
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from export.artifacts import MODEL_REPOSITORY, artifacts_dir, load_bundle
from export.dataplane import default_onnx_model, load_and_precompute
from stack.launch import ORCHESTRATOR_LOG, start_orchestrator


def ensure_artifacts(dataset: str) -> Path:
    """The dataset's bundle folder; trains and exports it first (minutes) when it or its ONNX ranker is
    missing or the exported ranker belongs to another model version."""
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


def run(dataset: str, port: int, use_triton: bool = True) -> int:
    from export.model_repository import render_profile_repository
    from stack.redis_local import start_server
    from stack.triton_launcher import TritonServer

    bundle_path = ensure_artifacts(dataset)
    bundle = load_bundle(bundle_path)
    onnx_path = default_onnx_model(bundle.manifest)
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
