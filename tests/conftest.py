"""Session fixtures shared by the tiers: a small trained + exported model, the MovieLens bundle, and a
real Triton serving the cpu profile. Everything is written under pytest's temporary folders, never
into the repository's own build/ or model_repository/."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from export.artifacts import Bundle
from export.data import SyntheticSpec, movielens_dir
from export.train import TrainConfig
from export.triton_config import BatchingSpec

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
    from export.triton_launcher import TritonServer

    tmp = tmp_path_factory.mktemp("triton")
    models = ranker_models(exported.bundle.dim, exported.batching)
    repo = render_profile_repository("cpu", tmp / "cpu", exported.repo, models=models)
    server = TritonServer(repo, log_path=tmp / "tritonserver.log")
    server.start()
    yield server
    server.stop()
