"""Session fixtures shared by the tiers: a small trained + exported model, the MovieLens bundle, and a
real Triton serving the cpu profile. Everything is written under pytest's temporary folders, never
into the repository's own build/ or model_repository/."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from export.artifacts import Bundle
from export.data import SyntheticSpec, movielens_dir
from export.train import TrainConfig
from export.triton_config import BatchingSpec
from tests.service_guard import GUARD, MARKER

# Test folders whose every test is in the integration tier (they train models or start services).
INTEGRATION_DIRS = ("integration", "faults")

# The named API key every orchestrator the tests start takes writes from (writes need one by default).
TEST_API_KEY = "tests-api-key-4d1c9e2b7a"
API_HEADERS = {"X-API-Key": TEST_API_KEY}

SMALL_DATA = SyntheticSpec(n_users=300, n_items=400, mean_interactions_per_user=40)
SMALL_TRAINING = TrainConfig(embedding_dim=32, retrieval_epochs=3, ranker_epochs=1)
# Small enough to keep parity checks at the max batch fast, large enough to batch across requests.
SMALL_BATCHING = BatchingSpec(
    max_batch_size=256, preferred_batch_sizes=(64, 128, 256), max_queue_delay_microseconds=5000
)
# Test-sized: fewer, larger ranker steps than the CLI default; still well above popularity on NDCG@10.
MOVIELENS_TRAINING = TrainConfig(
    embedding_dim=64,
    retrieval_epochs=8,
    retrieval_batch_size=1024,
    ranker_epochs=2,
    ranker_batch_size=4096,
    ranker_lr=3e-3,
)


# -- only tests marked integration start services (tests/service_guard.py) -------------------------------


def pytest_configure(config: pytest.Config) -> None:
    GUARD.install(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test of the service tiers carries the marker in its own module (not left to the guard to find)."""
    tests = Path(__file__).parent
    unmarked = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(tests)
        and item.path.relative_to(tests).parts[0] in INTEGRATION_DIRS
        and item.get_closest_marker(MARKER) is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"tests under tests/{{{','.join(INTEGRATION_DIRS)}}} must be marked {MARKER} "
            f"(`pytestmark = pytest.mark.{MARKER}`), but these are not: {', '.join(unmarked[:5])}"
        )


@dataclass
class Exported:
    bundle: Bundle
    build_dir: Path
    repo: Path
    batching: BatchingSpec

    @property
    def bundle_path(self) -> Path:
        return self.bundle.path


def _export(tmp: Path, dataset: str, cfg: TrainConfig, batching: BatchingSpec) -> Exported:
    from export.pipeline import run_all

    build_dir, repo = tmp / "build", tmp / "model_repository"
    bundle = run_all(dataset, cfg, build_dir=build_dir, repo=repo, batching=batching, synthetic=SMALL_DATA)
    return Exported(bundle, build_dir, repo, batching)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A small synthetic model, trained and exported to ONNX + TorchScript, with its FAISS index."""
    return _export(tmp_path_factory.mktemp("exported"), "synthetic", SMALL_TRAINING, SMALL_BATCHING)


def require_movielens() -> Path:
    folder = movielens_dir()
    if not (folder / "u.data").is_file():
        pytest.skip(
            f"MovieLens 100K not found at {folder}: set RECSERVE_MOVIELENS_DIR to a folder with "
            "u.data, u.item and u.user (the licence forbids shipping it with the project)"
        )
    return folder


@pytest.fixture(scope="session")
def movielens_exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The real MovieLens 100K, trained with the test-sized config and exported."""
    require_movielens()
    return _export(tmp_path_factory.mktemp("movielens"), "movielens", MOVIELENS_TRAINING, SMALL_BATCHING)


@pytest.fixture(scope="session")
def triton(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real tritonserver on the cpu profile of the small exported model."""
    from export.model_repository import render_profile_repository
    from export.triton_config import ranker_models
    from stack.triton_launcher import TritonServer

    tmp = tmp_path_factory.mktemp("triton")
    models = ranker_models(exported.bundle.dim, exported.batching)
    repo = render_profile_repository("cpu", tmp / "cpu", exported.repo, models=models)
    server = TritonServer(repo, log_path=tmp / "tritonserver.log")
    server.start()
    yield server
    server.stop()


@dataclass
class Stack:
    """A private redis-server loaded with the small exported model (+ pre-computed lists)."""

    redis: Any
    exported: Exported
    onnx_path: Path

    def env(self, triton_url: str | None, **overrides: str) -> dict[str, str]:
        env = {
            "RECSERVE_REDIS_URLS": self.redis.url,
            "RECSERVE_INDEX_PATH": str(self.exported.bundle_path / "item_index.faiss"),
            "RECSERVE_ONNX_MODEL_PATH": str(self.onnx_path),
            # Generous for a shared 2-core CI machine; the deadline tests set their own.
            "RECSERVE_DEADLINE_REQUEST_MS": "1000",
            "RECSERVE_DEADLINE_FALLBACK_RESERVE_MS": "200",
            "RECSERVE_REDIS_TIMEOUT_MS": "200",
            "RECSERVE_EVENTS_API_KEYS": f"tests:{TEST_API_KEY}",
        }
        if triton_url:
            env["RECSERVE_TRITON_URL"] = triton_url
        return env | overrides


@pytest.fixture(scope="session")
def stack(exported: Exported) -> Iterator[Stack]:
    import asyncio

    from export.dataplane import load_and_precompute
    from stack.redis_local import start_server

    server = start_server()
    onnx_path = exported.repo / "ranker_onnx" / "1" / "model.onnx"
    asyncio.run(load_and_precompute(server.url, exported.bundle, onnx_path, progress=False))
    yield Stack(server, exported, onnx_path)
    server.stop()


@contextmanager
def running_orchestrator(env: dict[str, str], log_path: Path) -> Iterator[Any]:
    from stack.launch import free_port, start_orchestrator

    orchestrator = start_orchestrator(env, free_port(), log_path=log_path)
    try:
        yield orchestrator
    finally:
        orchestrator.stop()


@pytest.fixture(scope="session")
def app_url(stack: Stack, triton: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The orchestrator over HTTP, ranking on the real Triton."""
    with running_orchestrator(stack.env(triton.grpc_url), tmp_path_factory.mktemp("app") / "app.log") as app:
        yield app.url


@pytest.fixture(scope="session")
def second_app_url(stack: Stack, triton: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second replica on the same Redis (for cross-replica invalidation)."""
    with running_orchestrator(stack.env(triton.grpc_url), tmp_path_factory.mktemp("app2") / "app.log") as app:
        yield app.url
