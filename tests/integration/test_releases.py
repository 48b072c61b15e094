"""Model releases without downtime: version 2 is built beside version 1, published during a steady request
loop, then rolled back; a replica follows each switch within seconds, without a restart, and every answer
stays a 200 from the model version of the moment (docs/RELEASES.md)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from export.__main__ import main as export_main
from export.artifacts import Bundle, artifacts_dir
from export.pipeline import run_all
from orchestrator.recommender import user_bucket
from orchestrator.store import keys, versions
from orchestrator.store.sharded import ShardedBackend
from tests.conftest import SMALL_DATA, SMALL_TRAINING, TEST_API_KEY, Exported, running_orchestrator
from tests.waiting import poll

pytestmark = pytest.mark.integration

SWITCH_BOUND_S = 5.0


@dataclass
class Answer:
    at: float  # time.monotonic() when the request was sent
    status: int
    source: str
    version: str
    user: str = ""
    arm: str = ""


@pytest.fixture(scope="module")
def version_2(exported: Exported) -> Bundle:
    """Version 2 of the small model, built beside version 1 (same build folder and model repository)."""
    return run_all(
        "synthetic",
        SMALL_TRAINING,
        version=2,
        build_dir=exported.build_dir,
        repo=exported.repo,
        batching=exported.batching,
        synthetic=SMALL_DATA,
    )


@pytest.fixture(scope="module")
def private_redis(exported: Exported) -> Iterator[Any]:
    """A Redis of its own: switching versions must not move the pointer under the session's other tests."""
    from export.dataplane import load_and_precompute
    from stack.redis_local import start_server

    server = start_server()
    asyncio.run(load_and_precompute(server.url, exported.bundle, exported.repo / "ranker_onnx" / "1" / "model.onnx"))
    yield server
    server.stop()


def replica_env(exported: Exported, redis_url: str) -> dict[str, str]:
    return {
        "RECSERVE_REDIS_URLS": redis_url,
        # {version}: the active version's number, so a replica finds each version's index and ranker.
        "RECSERVE_INDEX_PATH": str(exported.build_dir / "artifacts" / "synthetic" / "v{version}" / "item_index.faiss"),
        "RECSERVE_ONNX_MODEL_PATH": str(exported.repo / "ranker_onnx" / "{version}" / "model.onnx"),
        "RECSERVE_DEADLINE_REQUEST_MS": "1000",
        "RECSERVE_DEADLINE_FALLBACK_RESERVE_MS": "200",
        "RECSERVE_REDIS_TIMEOUT_MS": "200",
        "RECSERVE_EVENTS_API_KEYS": f"tests:{TEST_API_KEY}",
        "RECSERVE_VERSIONS_POLL_S": "2",
        "RECSERVE_VERSIONS_DRAIN_S": "2",
    }


class RequestLoop:
    """Steady GETs for known users (every user of the bundle has an embedding and a pre-computed list)."""

    def __init__(self, base: str, users: list[str], interval_s: float = 0.02) -> None:
        self.base, self.users, self.interval_s = base, users, interval_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                user = self.users[i % len(self.users)]
                i += 1
                sent = time.monotonic()
                response = client.get(f"{self.base}/v1/recommendations/{user}", params={"n": 10, "debug": "true"})
                body = response.json() if response.status_code == 200 else {}
                self.answers.append(
                    Answer(
                        sent,
                        response.status_code,
                        body.get("source", ""),
                        body.get("model_version", ""),
                        user,
                        body.get("arm", ""),
                    )
                )
                self._stop.wait(self.interval_s)


def cli(*args: str) -> None:
    assert export_main(list(args)) == 0


def test_triton_serves_a_published_version_beside_the_active_one(
    exported: Exported, version_2: Bundle, tmp_path: Path
) -> None:
    """The local stack's Triton polls its repository: the version folder ``publish`` adds is served beside
    the versions already there (version_policy all), and each ranker asks for its own version by number."""
    from export.model_repository import render_profile_repository
    from export.release import add_served_version, wait_until_served
    from export.triton_config import ranker_models
    from orchestrator.ranking import RankingRequest
    from orchestrator.ranking.triton_ranker import TritonRanker
    from stack.triton_launcher import TritonServer

    models = ranker_models(exported.bundle.dim, exported.batching)
    served = render_profile_repository("cpu", tmp_path / "cpu", exported.repo, models=models)
    for model in models:  # served as the stack served it before version 2 was built
        shutil.rmtree(served / model.name / "2")
    server = TritonServer(
        served, log_path=tmp_path / "triton.log", extra_args=("--model-control-mode=poll", "--repository-poll-secs=1")
    )
    server.start()
    try:
        assert add_served_version(served, exported.repo, 2) == [served / m.name / "2" for m in models]
        for model in models:
            wait_until_served(f"http://{server.http_url}", model.name, 2, 90)
            wait_until_served(f"http://{server.http_url}", model.name, 1, 5)  # still serving version 1
        dim = exported.bundle.dim
        request = RankingRequest(
            user_embedding=version_2.user_embeddings[0],
            user_features=version_2.user_features[0],
            item_embeddings=version_2.item_embeddings[:5],
            item_features=version_2.item_features[:5],
            context_features=np.zeros(2, dtype=np.int64),
        )
        assert version_2.item_embeddings.shape[1] == dim

        async def scores() -> list[np.ndarray]:
            rankers = [
                TritonRanker(server.grpc_url, model.name, f"v{n}", triton_version=n) for model in models for n in (1, 2)
            ]
            try:
                return [await ranker.score(request, timeout_s=10) for ranker in rankers]
            finally:
                for ranker in rankers:
                    await ranker.aclose()

        for got in asyncio.run(scores()):
            assert got.shape == (5,) and np.isfinite(got).all()
    finally:
        server.stop()


def test_publish_then_rollback_under_a_steady_request_loop(
    exported: Exported, version_2: Bundle, private_redis: Any, tmp_path: Path
) -> None:
    v1, v2 = exported.bundle.model_version, version_2.model_version
    assert v1 != v2
    # Side by side: version 2's bundle, Triton folder and index sit beside version 1's, which is intact.
    assert exported.bundle.path == artifacts_dir("synthetic", exported.build_dir, 1)
    assert version_2.path == artifacts_dir("synthetic", exported.build_dir, 2)
    for version in (1, 2):
        assert (artifacts_dir("synthetic", exported.build_dir, version) / "item_index.faiss").is_file()
        assert (exported.repo / "ranker_onnx" / str(version) / "model.onnx").is_file()
        assert (exported.repo / "ranker_torchscript" / str(version) / "model.pt").is_file()
    assert (exported.bundle.path / "manifest.json").read_text().count(v1) >= 1

    target = ["--redis", private_redis.url]
    common = ["--build-dir", str(exported.build_dir), "--repo", str(exported.repo), *target]
    users = exported.bundle.user_ids[:60]
    with running_orchestrator(replica_env(exported, private_redis.url), tmp_path / "app.log") as app:
        with RequestLoop(app.url, users) as loop:
            poll(lambda: len(loop.answers) >= 20, 30, "the request loop's first 20 answers")
            publish_started = time.monotonic()
            cli("publish", "--version", "2", "--no-progress", "--threads", "1", *common)
            published = time.monotonic()  # the switch is publish's last step
            time.sleep(SWITCH_BOUND_S + 2)
            # Version 1 is what a rollback returns to: retiring it is refused.
            assert export_main(["retire", "--version", "1", *common]) == 2
            cli("rollback", *target)
            rolled_back = time.monotonic()
            time.sleep(SWITCH_BOUND_S + 2)
            # A canary: half of the users (by a stable hash of the id) go to version 2, then it ends.
            cli("publish", "--version", "2", "--canary", "50", "--no-progress", "--threads", "1", *common)
            canary_on = time.monotonic()
            time.sleep(SWITCH_BOUND_S + 2)
            cli("rollback", *target)
            canary_off = time.monotonic()
            time.sleep(SWITCH_BOUND_S + 2)
        answers = list(loop.answers)
        readyz = httpx.get(f"{app.url}/readyz", timeout=10).json()

    assert len(answers) > 100
    bad = [a for a in answers if a.status != 200]
    assert not bad, f"{len(bad)} answers were not 200: {bad[:3]}"
    popular = [a for a in answers if a.source == "popular"]
    assert not popular, f"{len(popular)} known users got the popular list: {popular[:3]}"
    before = [a for a in answers if a.at < publish_started]
    on_v2 = [a for a in answers if published + SWITCH_BOUND_S <= a.at < rolled_back]
    on_v1_again = [a for a in answers if rolled_back + SWITCH_BOUND_S <= a.at < canary_on]
    in_canary = [a for a in answers if canary_on + SWITCH_BOUND_S <= a.at < canary_off]
    after_canary = [a for a in answers if a.at >= canary_off + SWITCH_BOUND_S]
    assert in_canary and after_canary
    for a in in_canary:
        expected = ("canary", v2) if user_bucket(a.user) < 50 else ("active", v1)
        assert (a.arm, a.version) == expected, a
    assert {a.arm for a in in_canary} == {"canary", "active"}
    assert {(a.arm, a.version) for a in after_canary} == {("active", v1)}
    assert before and on_v2 and on_v1_again
    assert {a.version for a in before} == {v1}
    assert {a.version for a in on_v2} == {v2}, sorted({a.version for a in on_v2})
    assert {a.version for a in on_v1_again} == {v1}, sorted({a.version for a in on_v1_again})
    assert readyz["components"]["version"] == f"ok ({v1})"

    async def with_backend(work: Any) -> Any:
        backend = ShardedBackend.from_urls([private_redis.url])
        try:
            return await work(backend)
        finally:
            await backend.aclose()

    assert asyncio.run(with_backend(versions.active_name)) == v1
    assert asyncio.run(with_backend(versions.previous_name)) == v2
    # A replica that holds v2 (a canary, say) keeps it from being retired; once its claim is gone, it goes:
    # its keys, and its Triton version folders; version 1 keeps everything.
    asyncio.run(with_backend(lambda b: versions.register(b, "other-replica", [v2], 60)))
    retire_v2 = ["retire", "--version", "2", "--drop-rollback-target", *common]
    assert export_main(retire_v2) == 2
    asyncio.run(with_backend(lambda b: versions.unregister(b, "other-replica", [v2])))
    cli(*retire_v2)
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert not client.keys(keys.version_pattern(v2))
        assert client.keys(keys.version_pattern(v1))
    finally:
        client.close()
    assert not (exported.repo / "ranker_onnx" / "2").exists()
    assert (exported.repo / "ranker_onnx" / "1" / "model.onnx").is_file()
    assert asyncio.run(with_backend(versions.previous_name)) is None
