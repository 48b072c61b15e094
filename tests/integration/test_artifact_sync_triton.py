"""k8s/base/sync/artifact-sync.sh beside a real polling tritonserver, run with the Deployment's model-control and
readiness flags: Triton serves LIVE, a new version folder arrives in STAGING, ``promote`` brings it into LIVE whole,
and Triton serves it beside the version it already served; a version STAGING drops (retired) is unloaded, the other
stays. All along, the server stays ready (the pod's readiness probe) and so does version 1 (what the replicas use).

What stays untested here: the pod itself (no cluster and no Docker engine on this machine), and ``aws s3 sync``
(tests/k8s/test_artifact_sync.py runs the sync loop with a stand-in)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from export.release import version_ready, wait_until_served
from tests.conftest import Exported
from tests.waiting import poll

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "k8s" / "base" / "sync" / "artifact-sync.sh"


def promote(staging: Path, live: Path) -> str:
    done = subprocess.run(
        ["/bin/sh", str(SCRIPT), "promote", str(staging), str(live)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def version_unloaded(url: str, model: str, version: int) -> bool:
    return not version_ready(url, model, version)


def test_a_polling_triton_serves_what_promote_adds_and_unloads_what_it_retires(
    exported: Exported, tmp_path: Path
) -> None:
    from export.model_repository import render_profile_repository
    from export.triton_config import ranker_models
    from stack.triton_launcher import TritonServer

    models = ranker_models(exported.bundle.dim, exported.batching)
    staging = render_profile_repository("cpu", tmp_path / "staging", exported.repo, models=models)
    for model in models:  # version 1 only, whatever other tests built beside it
        for folder in (staging / model.name).iterdir():
            if folder.is_dir() and folder.name != "1":
                shutil.rmtree(folder)
    live = tmp_path / "live"
    promote(staging, live)

    server = TritonServer(
        live,
        log_path=tmp_path / "triton.log",
        extra_args=("--model-control-mode=poll", "--repository-poll-secs=1", "--strict-readiness=false"),
    )
    server.start()
    url = f"http://{server.http_url}"
    watched = ["/v2/health/ready", *(f"/v2/models/{m.name}/versions/1/ready" for m in models)]
    unready: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # samples what must stay ready while versions come and go
        with httpx.Client(base_url=url, timeout=5) as client:
            while not stop.is_set():
                for path in watched:
                    try:
                        if client.get(path).status_code != 200:
                            unready.append(path)
                    except httpx.TransportError as exc:
                        unready.append(f"{path}: {exc}")
                stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # Version 2 reaches STAGING (what `aws s3 sync` does after the export Job uploaded it), then LIVE.
        for model in models:
            shutil.copytree(staging / model.name / "1", staging / model.name / "2", symlinks=True)
        added = promote(staging, live)
        assert all(f"added {live / m.name / '2'}" in added for m in models), added
        for model in models:
            wait_until_served(url, model.name, 2, 90)
            wait_until_served(url, model.name, 1, 5)  # still served beside version 2

        # Version 2 retired: gone from STAGING, then from LIVE; Triton unloads it and keeps version 1.
        for model in models:
            shutil.rmtree(staging / model.name / "2")
        removed = promote(staging, live)
        assert all(f"removed {live / m.name / '2'}" in removed for m in models), removed
        for name in (m.name for m in models):
            poll(functools.partial(version_unloaded, url, name, 2), 90, f"{name} version 2 unloaded", 0.2)
            assert version_ready(url, name, 1), f"{name} version 1 must stay served"
        assert not [p for p in tmp_path.rglob(".*")], "promote leaves no hidden folders behind"
    finally:
        stop.set()
        watcher.join()
        server.stop()
    assert not unready, f"expected the server and version 1 ready throughout, but these answered otherwise: {unready}"
