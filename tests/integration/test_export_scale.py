"""The scale path, small: ~20K users through data generation, sampled training, evaluation and the index,
into a temporary folder, with every stage in chunks. A dense users x items score matrix would take
20,000 x 5,000 x 4 B = 400 MB (and 800 MB of argsort indices); the traced memory peak (numpy and Python
objects) here must stay far below that."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from export.artifacts import artifacts_dir, load_bundle
from export.data import SyntheticSpec, read_spec
from export.pipeline import run_all
from export.train import TrainConfig
from tests.conftest import SMALL_BATCHING

pytestmark = pytest.mark.integration

# Past the generator's exact_items, so users draw from candidate pools (the O(interactions) path); small
# epochs, dims and histories, so that it takes about a minute on two shared cores.
SCALE_DATA = SyntheticSpec(n_users=20_000, n_items=5_000, mean_interactions_per_user=8, min_interactions_per_user=3)
SCALE_TRAINING = TrainConfig(
    embedding_dim=16,
    retrieval_epochs=1,
    retrieval_batch_size=1024,
    retrieval_lr=1e-2,
    ranker_epochs=1,
    ranker_batch_size=8192,
    ranker_lr=3e-3,
    negatives_per_positive=2,
    max_pairs_per_epoch=60_000,  # of ~130K training interactions: epochs and the ranker train on a draw
)
EVAL_USERS = 1_000
DENSE_BYTES = SCALE_DATA.n_users * SCALE_DATA.n_items * 4


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """On two cores shared with other work, torch's second intra-op thread spins more than it helps
    (measured: 4x slower training steps under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_twenty_thousand_users_run_in_chunks(tmp_path: Path) -> None:
    data_dir, build_dir, repo = tmp_path / "data", tmp_path / "build", tmp_path / "repo"
    tracemalloc.start()
    try:
        bundle = run_all(
            "synthetic",
            SCALE_TRAINING,
            build_dir=build_dir,
            repo=repo,
            batching=SMALL_BATCHING,
            synthetic=SCALE_DATA,
            data_dir=data_dir,
            eval_max_users=EVAL_USERS,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A dense path would hold a float32 score matrix (400 MB here) and its int64 argsort (800 MB).
    assert peak < DENSE_BYTES / 2, f"numpy/Python peak {peak / 2**20:.0f} MiB: a dense users x items matrix?"

    # The folders asked for, and nothing in the checkout.
    assert read_spec(data_dir) == SCALE_DATA and (data_dir / "u.data").is_file()
    assert bundle.path == artifacts_dir("synthetic", build_dir)
    assert (repo / "ranker_onnx" / "1" / "model.onnx").is_file()

    manifest = bundle.manifest
    assert manifest["n_users"] == SCALE_DATA.n_users and manifest["n_items"] == SCALE_DATA.n_items
    assert manifest["index"]["n_items"] == SCALE_DATA.n_items and manifest["index"]["recall_at_100"] >= 0.95
    loaded = load_bundle(bundle.path)
    assert loaded.user_embeddings.shape == (SCALE_DATA.n_users, SCALE_TRAINING.embedding_dim)
    assert np.isfinite(loaded.user_embeddings).all()
    # Every interaction is in the saved history (arrays, not one JSON object), in the data's order per user.
    assert int(loaded.user_history.indptr[-1]) == manifest["n_interactions"]
    assert sorted(p.name for p in bundle.path.glob("user_history*")) == [
        "user_history_indptr.npy",
        "user_history_items.npy",
    ]

    # Evaluation on a seeded sample of users, its size in metrics.json.
    metrics = json.loads((bundle.path / "metrics.json").read_text())
    assert metrics["_meta"]["users_evaluated"] == EVAL_USERS
    assert metrics["_meta"]["users_eligible"] > EVAL_USERS
    for name in ("popularity", "retrieval", "retrieval+ranking"):
        assert all(0.0 <= value <= 1.0 for value in metrics[name].values()), metrics[name]
    # One short epoch teaches the ranker enough to reorder retrieval's candidates for the better.
    assert metrics["retrieval+ranking"]["ndcg@10"] > metrics["retrieval"]["ndcg@10"]
