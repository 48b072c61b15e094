import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pytest

from export import faiss_index
from export.errors import IndexBuildError
from export.faiss_index import (
    EF_SEARCH_GRID,
    RECALL_TARGET,
    IndexKind,
    build_index,
    exact_neighbours,
    recall_at_k,
    search_grid,
)
from orchestrator.retrieval import FaissRetriever, IndexManifest


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


def test_an_ivf_index_reaches_the_recall_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = _unit(rng, 50, 32)
    items = centres[rng.integers(0, 50, 20_000)] + 0.3 * _unit(rng, 20_000, 32)
    ids = [str(i) for i in range(len(items))]
    manifest = build_index(items, ids, "v1", tmp_path / "ivf.faiss", exact_threshold=10_000)
    assert manifest.index_factory in {"IVF512_HNSW32,Flat", "IVF512,Flat"}  # whichever searched faster
    assert manifest.recall_at_100 >= 0.95
    assert set(manifest.search_params) == (
        {"nprobe", "quantizer_efSearch"} if "HNSW" in manifest.index_factory else {"nprobe"}
    )
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


def _mixture(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float, mix: int) -> np.ndarray:
    """Vectors near a mix of 1..``mix`` random centres (items: mix 1; users: up to 3), as bench.faiss_scale."""
    dim = centres.shape[1]
    out = np.zeros((n, dim), np.float32)
    for row in range(n):
        picked = rng.choice(len(centres), size=int(rng.integers(1, mix + 1)))
        out[row] = rng.dirichlet(np.ones(len(picked))) @ centres[picked]
    out += (spread / np.sqrt(dim)) * rng.normal(size=(n, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


Clustered = tuple[np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def clustered() -> Clustered:
    """12K loosely clustered items, 600 users to build with and 300 other users the build never saw."""
    rng = np.random.default_rng(7)
    centres = _unit(rng, 40, 32)
    items = _mixture(rng, centres, 12_000, 1.2, 1)
    return items, _mixture(rng, centres, 600, 1.2, 3), _mixture(rng, centres, 300, 1.2, 3)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, clustered: Clustered) -> Callable[[IndexKind], Path]:
    """The index of a kind over ``clustered``, built (IVF from a lowered threshold) once per module."""
    items, users, _ = clustered
    paths: dict[IndexKind, Path] = {}

    def build(kind: IndexKind) -> Path:
        if kind not in paths:
            path = tmp_path_factory.mktemp(kind) / "idx.faiss"
            ids = [f"i{r}" for r in range(len(items))]
            build_index(items, ids, "v1", path, queries=users, exact_threshold=10_000, kind=kind)
            paths[kind] = path
        return paths[kind]

    return build


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("ivf_hnsw_flat", {"nprobe", "quantizer_efSearch"}),
        ("ivf_flat", {"nprobe"}),
        ("ivf_hnsw_pq", {"nprobe", "quantizer_efSearch", "k_factor_rf"}),
        ("hnsw_flat", {"efSearch"}),
    ],
)
def test_every_kind_chooses_its_search_params_on_users_it_then_meets_on_other_users(
    built: Callable[[IndexKind], Path], clustered: Clustered, kind: IndexKind, names: set[str]
) -> None:
    items, _, unseen = clustered
    path = built(kind)
    manifest = IndexManifest.from_json(json.loads(path.with_suffix(".json").read_text()))
    assert set(manifest.search_params) == names
    assert manifest.recall_at_100 >= RECALL_TARGET  # held out from the tuning inside the build
    assert manifest.recall_at_100_tuning is not None and manifest.recall_at_100_tuning >= RECALL_TARGET
    assert manifest.full_length_k == 1000 and manifest.full_length_fraction == 1.0
    # Served: the retriever applies the recorded params; on users neither split saw, the target holds and
    # every list is full at the serving (200) and the pre-compute (up to 1,000) depths.
    retriever = FaissRetriever(path)
    found, _ = retriever.search_sync(unseen, 100)
    rows = np.array([[int(i[1:]) for i in row] for row in found])
    assert recall_at_k(rows, exact_neighbours(items, unseen, 100)) >= RECALL_TARGET
    for k in (200, 1000):
        found, scores = retriever.search_sync(unseen, k)
        assert [len(row) for row in found] == [k] * len(unseen) and scores.shape == (len(unseen), k)


def test_the_build_falls_back_to_an_exact_quantizer_when_the_graph_one_misses_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clustered: Clustered
) -> None:
    items, users, _ = clustered
    grid = faiss_index.search_grid

    def one_list_through_the_graph(kind: IndexKind, nlist: int) -> Iterator[list[dict[str, int]]]:
        if kind == "ivf_hnsw_flat":  # a graph quantizer stuck at one list: no setting reaches the target
            yield [{"nprobe": 1, "quantizer_efSearch": 16}]
            return
        yield from grid(kind, nlist)

    monkeypatch.setattr(faiss_index, "search_grid", one_list_through_the_graph)
    manifest = build_index(
        items, [str(i) for i in range(len(items))], "v1", tmp_path / "i.faiss", queries=users, exact_threshold=10_000
    )
    assert manifest.index_factory == "IVF512,Flat" and manifest.recall_at_100 >= RECALL_TARGET
    assert set(manifest.search_params) == {"nprobe"}
    monkeypatch.setattr(faiss_index, "LARGE_KINDS", ("ivf_hnsw_flat",))
    with pytest.raises(IndexBuildError, match=r"expected a IVF512_HNSW32,Flat setting .* found recall 0\.\d+"):
        build_index(
            items,
            [str(i) for i in range(len(items))],
            "v1",
            tmp_path / "j.faiss",
            queries=users,
            exact_threshold=10_000,
        )


def test_the_build_tunes_every_large_kind_and_keeps_the_fastest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clustered: Clustered
) -> None:
    items, users, _ = clustered
    real = faiss_index.tune_kind
    tuned: list[faiss_index.Tuned | str] = []

    def recording(*args: Any, **kwargs: Any) -> faiss_index.Tuned | str:
        tuned.append(real(*args, **kwargs))
        return tuned[-1]

    monkeypatch.setattr(faiss_index, "tune_kind", recording)
    ids = [str(i) for i in range(len(items))]
    manifest = build_index(items, ids, "v1", tmp_path / "i.faiss", queries=users, exact_threshold=10_000)
    qualified = [t for t in tuned if isinstance(t, faiss_index.Tuned)]
    assert [t.kind for t in qualified] == list(faiss_index.LARGE_KINDS)  # both meet the target on this data
    fastest = min(qualified, key=lambda t: t.search_ms)
    assert all(t.search_ms > 0 for t in qualified)
    assert manifest.index_factory == fastest.factory and manifest.search_params == fastest.params


def test_the_retriever_applies_every_recorded_param(built: Callable[[IndexKind], Path]) -> None:
    retriever = FaissRetriever(built("ivf_hnsw_pq"))
    index, manifest = retriever.index, retriever.manifest
    ivf = faiss.extract_index_ivf(index)
    quantizer: Any = faiss.downcast_index(ivf.quantizer)  # the stubs type it as the base Index
    applied = {
        "nprobe": ivf.nprobe,
        "quantizer_efSearch": quantizer.hnsw.efSearch,
        "k_factor_rf": int(cast(Any, index).k_factor),
    }
    assert applied == manifest.search_params
    assert manifest.nprobe == manifest.search_params["nprobe"]


def test_a_manifest_written_before_search_params_still_sets_nprobe(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = _unit(rng, 50, 32)
    items = centres[rng.integers(0, 50, 12_000)] + 0.3 * _unit(rng, 12_000, 32)
    build_index(items, [str(i) for i in range(len(items))], "v1", tmp_path / "old.faiss", exact_threshold=10_000)
    meta_path = tmp_path / "old.json"
    meta = json.loads(meta_path.read_text())
    for name in ("search_params", "recall_at_100_tuning", "full_length_k", "full_length_fraction", "build_seconds"):
        del meta[name]
    meta["nprobe"] = 7
    meta_path.write_text(json.dumps(meta))
    retriever = FaissRetriever(tmp_path / "old.faiss")
    assert retriever.manifest.search_params == {} and faiss.extract_index_ivf(retriever.index).nprobe == 7


def test_a_manifest_missing_a_field_is_named() -> None:
    with pytest.raises(ValueError, match=r"expected an index manifest with \['nprobe', 'recall_at_100'\]"):
        IndexManifest.from_json({"model_version": "v", "dim": 4, "metric": "ip", "n_items": 1, "index_factory": "Flat"})


def test_an_unreachable_target_fails_the_build_and_says_what_was_reached(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    items = _unit(rng, 1_500, 16)
    with pytest.raises(
        IndexBuildError, match=r"expected a HNSW32,Flat setting with recall@100 >= 1\.005 .* but the best"
    ):
        build_index(
            items,
            [str(i) for i in range(1_500)],
            "v",
            tmp_path / "x.faiss",
            exact_threshold=1_000,
            kind="hnsw_flat",
            recall_target=1.0,
        )
    assert not (tmp_path / "x.faiss").exists()


def test_the_grid_raises_nprobe_up_to_the_quantizers_efsearch_and_to_nlist_at_the_last() -> None:
    chains = list(search_grid("ivf_hnsw_flat", 4096))
    assert [chain[0]["quantizer_efSearch"] for chain in chains] == list(EF_SEARCH_GRID)
    for chain in chains[:-1]:
        assert [p["nprobe"] for p in chain][-1] == chain[0]["quantizer_efSearch"]
    # Past the largest efSearch the graph search widens with nprobe: a graph returns at most efSearch lists.
    assert [(p["nprobe"], p["quantizer_efSearch"]) for p in chains[-1][-3:]] == [
        (1024, 2048),
        (2048, 2048),
        (4096, 4096),
    ]
    assert [p["nprobe"] for chain in search_grid("ivf_flat", 64) for p in chain] == [1, 2, 4, 8, 16, 32, 64]
    assert {p["k_factor_rf"] for chain in search_grid("ivf_hnsw_pq", 64) for p in chain} == {2, 4, 8}


def test_a_search_param_the_index_lacks_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    build_index(_unit(rng, 200, 8), [str(i) for i in range(200)], "v1", tmp_path / "flat.faiss")
    meta = json.loads((tmp_path / "flat.json").read_text())
    (tmp_path / "flat.json").write_text(json.dumps(meta | {"search_params": {"nprobe": 4}}))
    with pytest.raises(ValueError, match="expected search parameter nprobe=4 to apply to IndexFlatIP, but FAISS"):
        FaissRetriever(tmp_path / "flat.faiss")


def test_recall_counts_a_near_tie_at_the_boundary_but_not_a_worse_item() -> None:
    vectors = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6 - 1e-7], [0.0, 1.0]], dtype=np.float32)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    truth = exact_neighbours(vectors, query, 2)  # rows 0 and one of the tied 1, 2
    assert recall_at_k(np.array([[0, 1]]), truth) == recall_at_k(np.array([[0, 2]]), truth) == 1.0
    assert recall_at_k(np.array([[0, 3]]), truth) == 0.5  # 0.0 is no near-tie of 0.8
    assert recall_at_k(np.array([[0, 0]]), truth) == 0.5  # one item found twice is one hit
