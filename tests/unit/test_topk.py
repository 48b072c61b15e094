"""The chunked top-k (export.topk) gives exactly what the dense users x items computation gave: the same
hard negatives for the ranker and the same offline metrics, on small cases split into many chunks."""

from __future__ import annotations

import numpy as np
import pytest

from export import topk
from export.data import Dataset, temporal_split
from export.evaluate import evaluate, recall_ndcg
from export.topk import UserItems, top_k
from export.train import hard_negatives


def _tables(n_users: int, n_items: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_users, dim)).astype(np.float32), rng.normal(size=(n_items, dim)).astype(np.float32)


def _dense_top(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(users @ items.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("budget", [1, 37, 500, 1 << 20])
def test_chunked_top_k_equals_the_dense_stable_sort(budget: int) -> None:
    users, items = _tables(53, 41)
    rows, tops = zip(*top_k(users, items, 10, budget=budget), strict=True)
    assert np.concatenate(rows).tolist() == list(range(53))
    np.testing.assert_array_equal(np.concatenate(tops), _dense_top(users, items, 10))
    if budget < 41 * 53:
        assert len(rows) > 1  # really chunked


def test_ties_keep_the_dense_order() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(-2, 3, size=(20, 4)).astype(np.float32)  # small integers: many tied scores
    items = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)
    got = np.concatenate([top for _, top in top_k(users, items, 7, budget=90)])
    np.testing.assert_array_equal(got, _dense_top(users, items, 7))


def test_excluded_items_are_skipped_and_short_rows_padded() -> None:
    users, items = _tables(6, 12)
    seen_users = np.array([0, 0, 2, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    seen_items = np.array([3, 3, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    seen = UserItems.of(seen_users, seen_items, 6)
    assert seen[0].tolist() == [3] and seen[1].tolist() == [] and seen.counts().tolist() == [1, 0, 1, 0, 0, 10]
    got = np.concatenate([top for _, top in top_k(users, items, 5, exclude=seen, budget=24)])
    order = np.argsort(-(users @ items.T), axis=1, kind="stable")
    for u in range(6):
        expected = [i for i in order[u] if i not in set(seen[u].tolist())][:5]
        expected += [-1] * (5 - len(expected))  # user 5 has only 2 unseen items
        assert got[u].tolist() == expected


def test_the_heap_path_for_large_catalogues_equals_the_chunked_one(monkeypatch: pytest.MonkeyPatch) -> None:
    users, items = _tables(70, 400, seed=8)
    rng = np.random.default_rng(9)
    # Random histories, and user 3 has seen all but 5 items: their row ends in 15 paddings.
    seen_users = np.r_[rng.integers(0, 70, size=900), np.full(395, 3)]
    seen_items = np.r_[rng.integers(0, 400, size=900), np.arange(395)]
    seen_items[seen_users == 3] = np.minimum(seen_items[seen_users == 3], 394)
    seen = UserItems.of(seen_users, seen_items, 70)
    wanted = np.r_[3, rng.permutation(np.arange(4, 70))[:49]]
    chunked = np.concatenate([top for _, top in top_k(users, items, 20, wanted, exclude=seen, budget=2000)])
    assert (chunked[0] == -1).sum() == 15 and (chunked[1:] >= 0).all()
    monkeypatch.setattr(topk, "HEAP_FROM_ITEMS", 400)
    monkeypatch.setattr(topk, "HEAP_CHUNK_USERS", 16)
    parts = list(top_k(users, items, 20, wanted, exclude=seen))
    assert len(parts) == 4 and np.concatenate([rows for rows, _ in parts]).tolist() == wanted.tolist()
    np.testing.assert_array_equal(np.concatenate([top for _, top in parts]), chunked)


def test_hard_negatives_equal_the_dense_nearest_items() -> None:
    user_table, item_table = _tables(120, 300, dim=16, seed=1)
    rng = np.random.default_rng(2)
    users = rng.integers(0, 120, size=2000)
    columns = rng.integers(0, 200, size=2000)
    dense_nearest = _dense_top(user_table, item_table, 200)  # what train_ranker allocated before
    expected = dense_nearest[users, columns]
    chunks_before = topk.CHUNK_SCORES
    try:
        topk.CHUNK_SCORES = 3 * 300  # three users per chunk
        got = hard_negatives(user_table, item_table, users, columns)
    finally:
        topk.CHUNK_SCORES = chunks_before
    np.testing.assert_array_equal(got, expected)
    # Restricted to a catalog sample, the rows map back to the full catalog.
    catalog = np.arange(0, 300, 2)
    got = hard_negatives(user_table, item_table, users, columns % 150, depth=150, catalog=catalog)
    np.testing.assert_array_equal(got, catalog[_dense_top(user_table, item_table[catalog], 150)[users, columns % 150]])


def _dataset(n_users: int = 80, n_items: int = 60, seed: int = 4) -> Dataset:
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        # Zipf-ish popularity, so the popularity baseline has ties and structure to get right.
        chosen = rng.choice(n_items, size=int(rng.integers(2, 25)), replace=False, p=_zipf(n_items))
        users += [u] * len(chosen)
        items += chosen.tolist()
    n = len(users)
    return Dataset(
        "t",
        [str(u) for u in range(n_users)],
        [str(i) for i in range(n_items)],
        np.ones((n_users, 3), np.int64),
        np.ones((n_items, 2), np.int64),
        np.asarray(users, np.int64),
        np.asarray(items, np.int64),
        np.ones(n, np.float32),
        rng.integers(0, 10**6, size=n),
    )


def _zipf(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1)
    return p / p.sum()


def _dense_evaluate(data: Dataset, user_table: np.ndarray, item_table: np.ndarray, score, ks=(10, 50), n_cand=100):
    """The evaluation as it was: one users x items score matrix and Python sets."""
    split = temporal_split(data)
    train_seen: list[set[int]] = [set() for _ in range(data.n_users)]
    test_items: list[set[int]] = [set() for _ in range(data.n_users)]
    for u, i, t in zip(data.user_idx.tolist(), data.item_idx.tolist(), split.test.tolist(), strict=True):
        (test_items if t else train_seen)[u].add(i)

    def top_unseen(scores: np.ndarray, seen: set[int], k: int) -> np.ndarray:
        order = np.argsort(-scores, kind="stable")
        return np.fromiter((i for i in order if i not in seen), dtype=np.int64, count=k)

    users = [u for u in range(data.n_users) if test_items[u]]
    counts = np.bincount(data.item_idx[split.train], minlength=data.n_items).astype(np.float64)
    n_cand = max(n_cand, max(ks))
    all_scores = user_table[users] @ item_table.T
    lists: dict[str, list[np.ndarray]] = {"popularity": [], "retrieval": [], "retrieval+ranking": []}
    for row, u in enumerate(users):
        budget = min(n_cand, data.n_items - len(train_seen[u]))
        lists["popularity"].append(top_unseen(counts, train_seen[u], min(max(ks), budget)))
        candidates = top_unseen(all_scores[row], train_seen[u], budget)
        lists["retrieval"].append(candidates)
        lists["retrieval+ranking"].append(candidates[np.argsort(-score(u, candidates), kind="stable")])
    truth = [test_items[u] for u in users]
    return {
        name: {f"{m}@{k}": recall_ndcg(found, truth, k)[j] for k in ks for j, m in enumerate(("recall", "ndcg"))}
        for name, found in lists.items()
    }, len(users)


def test_chunked_evaluation_equals_the_dense_one() -> None:
    data = _dataset()
    user_table, item_table = _tables(data.n_users, data.n_items, seed=5)
    rng = np.random.default_rng(6)
    ranker_scores = rng.normal(size=(data.n_users, data.n_items))

    def score(u: int, candidates: np.ndarray) -> np.ndarray:
        return ranker_scores[u, candidates]

    expected, n_users = _dense_evaluate(data, user_table, item_table, score, ks=(5, 20), n_cand=30)
    chunks_before = topk.CHUNK_SCORES
    try:
        topk.CHUNK_SCORES = 7 * data.n_items  # 7 users per chunk
        got = evaluate(data, temporal_split(data), user_table, item_table, score, ks=(5, 20), n_candidates=30)
    finally:
        topk.CHUNK_SCORES = chunks_before
    meta = got.pop("_meta")
    assert meta["users_evaluated"] == meta["users_eligible"] == n_users
    assert got == expected


def test_evaluation_samples_users_past_the_bound_with_a_seed() -> None:
    data = _dataset(n_users=200)
    user_table, item_table = _tables(data.n_users, data.n_items, seed=7)

    def score(u: int, candidates: np.ndarray) -> np.ndarray:
        return -candidates.astype(np.float64)

    split = temporal_split(data)
    first = evaluate(data, split, user_table, item_table, score, max_users=50, seed=3)
    again = evaluate(data, split, user_table, item_table, score, max_users=50, seed=3)
    assert first == again
    assert first["_meta"]["users_evaluated"] == 50 and first["_meta"]["users_eligible"] == 200
    whole = evaluate(data, split, user_table, item_table, score, max_users=None)
    assert whole["_meta"]["users_evaluated"] == 200
