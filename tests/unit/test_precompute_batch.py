"""The batched pre-compute (export.precompute.BatchScorer) gives every user the list the straightforward
per-user reference (``offline_top_n``: search at the user's own depth, drop seen items, rank alone, stable
top-N) gives, on an exact and on an IVF index, in batches and rank chunks that do not line up with users."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from bench.precompute import synthetic_bundle
from export.artifacts import Bundle, load_bundle
from export.precompute import (
    BatchScorer,
    CandidateRanker,
    Candidates,
    FactoredCandidates,
    ItemTables,
    OnnxCandidates,
    PrecomputeConfig,
    ShardUsers,
    _ranker_run,
    offline_top_n,
    shard_rows,
    top_n,
)
from export.ranker_bf16 import BF16_TOLERANCE, Bf16Scorer
from export.ranker_factored import FactoredParityError
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.retrieval import FaissRetriever
from tests.bundles import reference_scores

SCORE_TOL = 1e-5


def _replace_with_hnsw(path: Path) -> None:
    """An HNSW index over the same items: one where the search depth k changes the search (ef >= k)."""
    meta = json.loads((path / "item_index.json").read_text())
    vectors = np.load(path / "item_embeddings.npy")
    index = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    faiss.write_index(index, str(path / "item_index.faiss"))
    meta |= {"index_factory": "HNSW16", "nprobe": 0, "search_params": {"efSearch": 16}}
    (path / "item_index.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module", params=["flat", "ivf", "hnsw"])
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Path]:
    path = tmp_path_factory.mktemp(f"precompute-{request.param}")
    # 2,000 items: exact below the threshold; with the threshold at 1,000, IVF-HNSW with nprobe tuned.
    threshold = 1_000 if request.param == "ivf" else 50_000
    synthetic_bundle(path, 150, 2_000, dim=16, mean_history=40, min_history=1, exact_threshold=threshold)
    if request.param == "hnsw":
        _replace_with_hnsw(path)
    return load_bundle(path), path


def assert_same_list(got_items: list[str], got_scores: list[float], items: list[str], scores: list[float]) -> None:
    """Equal, or different only where scores tie (within float rounding between batch shapes)."""
    assert len(got_items) == len(items)
    np.testing.assert_allclose(got_scores, scores, rtol=0, atol=SCORE_TOL)
    for j, (a, b) in enumerate(zip(got_items, items, strict=True)):
        if a != b:
            assert abs(got_scores[j] - scores[j]) <= SCORE_TOL, (j, a, b)
            tied = [i for i, s in zip(items, scores, strict=True) if abs(s - scores[j]) <= SCORE_TOL]
            assert a in tied, (j, a, tied)


def scorer_for(bundle: Bundle, path: Path, cfg: PrecomputeConfig, kind: str, ranker: OnnxRanker) -> BatchScorer:
    items = ItemTables.of(bundle)
    retriever = FaissRetriever(path / "item_index.faiss")
    users = ShardUsers.of(bundle, shard_rows(len(bundle.user_ids), 0, 1))
    rank: CandidateRanker = (
        FactoredCandidates.build(items, path / "ranker.onnx", ranker.run, users, bf16=kind == "bf16")
        if kind in ("factored", "bf16")
        else OnnxCandidates(items, ranker.run, cfg.rank_rows)
    )
    return BatchScorer(items, retriever.index, rank, cfg)


@pytest.mark.parametrize("kind", ["onnx", "factored"])
@pytest.mark.parametrize(("batch_users", "rank_rows"), [(1, 7), (64, 1000), (150, 1024)])
def test_batched_lists_equal_the_per_user_reference(
    small: tuple[Bundle, Path], batch_users: int, rank_rows: int, kind: str
):
    bundle, path = small
    retriever = FaissRetriever(path / "item_index.faiss")
    ranker = OnnxRanker(path / "ranker.onnx", bundle.model_version)
    cfg = PrecomputeConfig(top_n=20, n_candidates=60, batch_users=batch_users, rank_rows=rank_rows)
    users = ShardUsers.of(bundle, shard_rows(len(bundle.user_ids), 0, 1))
    scorer = scorer_for(bundle, path, cfg, kind, ranker)
    assert scorer.prefix_stable == ("HNSW" not in retriever.manifest.index_factory.split("_")[0])
    reference = Candidates(bundle, retriever, cfg)
    exact = 0
    for lo in range(0, len(users), batch_users):
        part = users[lo : lo + batch_users]
        recs = scorer.recommendations(part, scorer(part), bundle.model_version)
        for row, user in zip(part.rows.tolist(), part.ids, strict=True):
            items, scores = offline_top_n(reference, row, ranker.run)
            got = recs[user]
            assert_same_list(list(got.items), list(got.scores), items, scores)
            assert not set(got.items) & set(bundle.user_history[user])
            exact += list(got.items) == items
    assert exact >= 0.98 * len(users)  # ties are the rare exception, not the rule


@pytest.mark.parametrize("batch_users", [1, 64])
def test_bf16_lists_differ_from_the_reference_only_among_near_ties(small: tuple[Bundle, Path], batch_users: int):
    """``--ranker bf16``: every score within BF16_TOLERANCE of the fp32 model's; an item misses the list, or two
    swap places, only where the fp32 scores are that close."""
    bundle, path = small
    retriever = FaissRetriever(path / "item_index.faiss")
    ranker = OnnxRanker(path / "ranker.onnx", bundle.model_version)
    cfg = PrecomputeConfig(top_n=20, n_candidates=60, batch_users=batch_users)
    users = ShardUsers.of(bundle, shard_rows(len(bundle.user_ids), 0, 1))
    scorer = scorer_for(bundle, path, cfg, "bf16", ranker)
    assert isinstance(scorer.rank, FactoredCandidates) and isinstance(scorer.rank.scorer, Bf16Scorer)
    reference = Candidates(bundle, retriever, cfg)
    near = 2 * BF16_TOLERANCE
    kept = []
    for lo in range(0, len(users), batch_users):
        part = users[lo : lo + batch_users]
        recs = scorer.recommendations(part, scorer(part), bundle.model_version)
        for row, user in zip(part.rows.tolist(), part.ids, strict=True):
            fp32 = reference_scores(reference, row, ranker.run)
            top, _ = top_n(list(fp32), np.array(list(fp32.values())), cfg.top_n)  # offline_top_n's list
            got = recs[user]
            assert len(got.items) == len(top) and not set(got.items) & set(bundle.user_history[user])
            np.testing.assert_allclose(got.scores, [fp32[i] for i in got.items], rtol=0, atol=BF16_TOLERANCE)
            last = fp32[top[-1]]
            assert {i for i in top if fp32[i] > last + near} <= set(got.items)
            assert all(fp32[a] >= fp32[b] - near for a, b in zip(got.items, got.items[1:], strict=False))
            kept.append(len(set(got.items) & set(top)) / len(top))
    assert np.mean(kept) >= 0.99


def test_shard_users_hold_only_their_rows_and_seen_items(small: tuple[Bundle, Path]):
    bundle, path = small
    rows = shard_rows(len(bundle.user_ids), 1, 3)
    users = ShardUsers.read(path, rows)  # what a worker process reads: memory-mapped, sliced
    assert users.ids == [bundle.user_ids[r] for r in rows.tolist()]
    np.testing.assert_array_equal(users.embeddings, bundle.user_embeddings[rows])
    # Every W-th user from the w-th, as the processes of a pod split it: seen sets travel with their users.
    part = users[np.arange(1, len(users), 2)]
    for k, user in enumerate(part.ids):
        seen = part.seen_items[part.seen_indptr[k] : part.seen_indptr[k + 1]]
        assert sorted(bundle.item_ids[i] for i in seen) == sorted(set(bundle.user_history[user]))


def test_a_user_with_fewer_unseen_items_than_top_n_gets_a_short_list(tmp_path: Path):
    synthetic_bundle(tmp_path, 4, 30, dim=16, mean_history=20, min_history=12)
    bundle = load_bundle(tmp_path)
    retriever = FaissRetriever(tmp_path / "item_index.faiss")
    ranker = OnnxRanker(tmp_path / "ranker.onnx", bundle.model_version)
    cfg = PrecomputeConfig(top_n=25, n_candidates=25)
    users = ShardUsers.of(bundle, shard_rows(4, 0, 1))
    scorer = scorer_for(bundle, tmp_path, cfg, "factored", ranker)
    recs = scorer.recommendations(users, scorer(users), bundle.model_version)
    reference = Candidates(bundle, retriever, cfg)
    for row, user in enumerate(bundle.user_ids):
        items, scores = offline_top_n(reference, row, ranker.run)
        assert len(items) == 30 - len(set(bundle.user_history[user])) < 25
        assert_same_list(list(recs[user].items), list(recs[user].scores), items, scores)


def test_a_ranker_without_a_batch_run_is_refused_with_the_reason():
    with pytest.raises(TypeError, match=r"needs a ranker with a synchronous batch run\(tensors\).*but found object"):
        _ranker_run(object())


def test_the_factored_ranker_refuses_a_model_it_does_not_match(small: tuple[Bundle, Path]):
    bundle, path = small
    ranker = OnnxRanker(path / "ranker.onnx", bundle.model_version)
    items = ItemTables.of(bundle)
    users = ShardUsers.of(bundle, shard_rows(len(bundle.user_ids), 0, 1))

    def other_model(tensors: dict[str, np.ndarray]) -> np.ndarray:
        return ranker.run(tensors) + 1e-3

    with pytest.raises(FactoredParityError, match=r"within 1e-05, but found max \|diff\| 0\.001.*--ranker onnx"):
        FactoredCandidates.build(items, path / "ranker.onnx", other_model, users)
