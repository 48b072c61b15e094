import json
import threading
from pathlib import Path

import numpy as np
import pytest

from export.errors import IndexBuildError
from export.faiss_index import build_index
from orchestrator.retrieval import FaissRetriever


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


async def test_exact_index_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = _unit(rng, 500, 16)
    ids = [str(i + 1) for i in range(500)]
    manifest = build_index(items, ids, "v1", tmp_path / "idx.faiss")
    assert manifest.index_factory == "Flat" and manifest.recall_at_100 == 1.0
    retriever = FaissRetriever(tmp_path / "idx.faiss")
    found, scores = await retriever.search(items[:3], k=5)
    assert [row[0] for row in found] == ["1", "2", "3"]  # each item is its own nearest neighbour
    assert scores.shape == (3, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize(("inline_max_s", "on_the_loop"), [(1.0, True), (0.0, False)])
async def test_a_short_search_runs_on_the_event_loop_and_a_long_one_in_a_thread(
    tmp_path: Path, inline_max_s: float, on_the_loop: bool
) -> None:
    rng = np.random.default_rng(0)
    items = _unit(rng, 300, 16)
    build_index(items, [str(i) for i in range(300)], "v1", tmp_path / "idx.faiss")
    retriever = FaissRetriever(tmp_path / "idx.faiss", inline_max_s=inline_max_s)
    assert retriever.inline is on_the_loop and 0 < retriever.search_s < 1.0
    threads: list[int] = []
    search_sync = retriever.search_sync

    def recording(user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        threads.append(threading.get_ident())
        return search_sync(user_vectors, k)

    retriever.search_sync = recording  # type: ignore[method-assign]
    found, _ = await retriever.search(items[:2], k=3)
    assert [row[0] for row in found] == ["0", "1"]  # same answer either way
    assert (threads == [threading.get_ident()]) is on_the_loop


def test_ivf_hnsw_index_reaches_the_recall_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = _unit(rng, 50, 32)
    items = centres[rng.integers(0, 50, 20_000)] + 0.3 * _unit(rng, 20_000, 32)
    ids = [str(i) for i in range(len(items))]
    manifest = build_index(items, ids, "v1", tmp_path / "ivf.faiss", exact_threshold=10_000)
    assert manifest.index_factory.startswith("IVF") and manifest.index_factory.endswith("_HNSW32,Flat")
    assert manifest.recall_at_100 >= 0.95
    written = json.loads((tmp_path / "ivf.json").read_text())
    assert written["recall_at_100"] == manifest.recall_at_100 and len(written["item_ids"]) == 20_000
    retriever = FaissRetriever(tmp_path / "ivf.faiss")
    found, _ = retriever.search_sync(items[:1], k=10)
    assert len(found[0]) == 10


def test_bad_embeddings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(IndexBuildError, match=r"expected item_embeddings of shape \[3, dim\], but found \[2, 4\]"):
        build_index(np.zeros((2, 4), np.float32), ["a", "b", "c"], "v", tmp_path / "x.faiss")
    bad = np.ones((2, 4), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(IndexBuildError, match="expected finite item embeddings"):
        build_index(bad, ["a", "b"], "v", tmp_path / "x.faiss")


def test_missing_index_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"FAISS index .*nothing.faiss"):
        FaissRetriever(tmp_path / "nothing.faiss")
