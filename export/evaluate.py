"""Offline evaluation on the held-out (latest) interactions: Recall@K and NDCG@K for retrieval alone,
retrieval + ranking, and the popularity baseline."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from export.data import Dataset, Split
from orchestrator import schema

# Scores a batch of (user row, candidate item rows) and returns one score per candidate.
ScoreFn = Callable[[int, np.ndarray], np.ndarray]


def recall_ndcg(recommended: list[np.ndarray], relevant: list[set[int]], k: int) -> tuple[float, float]:
    """Mean Recall@k and NDCG@k over users with at least one relevant item."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for recs, truth in zip(recommended, relevant, strict=True):
        if not truth:
            continue
        hits = np.fromiter((item in truth for item in recs[:k]), dtype=bool, count=min(k, len(recs)))
        recalls.append(hits.sum() / len(truth))
        ideal = discounts[: min(len(truth), k)].sum()
        ndcgs.append(float((discounts[: len(hits)] * hits).sum() / ideal))
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def seen_by_user(data: Dataset, mask: np.ndarray) -> list[set[int]]:
    seen: list[set[int]] = [set() for _ in range(data.n_users)]
    for u, i in zip(data.user_idx[mask].tolist(), data.item_idx[mask].tolist(), strict=True):
        seen[u].add(i)
    return seen


def _top_unseen(scores: np.ndarray, seen: set[int], k: int) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    return np.fromiter((i for i in order if i not in seen), dtype=np.int64, count=k) if k else order[:0]


def evaluate(
    data: Dataset,
    split: Split,
    user_table: np.ndarray,
    item_table: np.ndarray,
    score_candidates: ScoreFn,
    ks: tuple[int, ...] = (10, 50),
    n_candidates: int = 100,
) -> dict[str, dict[str, float]]:
    """Returns ``{"popularity"|"retrieval"|"retrieval+ranking": {"recall@K": .., "ndcg@K": ..}}``."""
    train_seen = seen_by_user(data, split.train)
    test_items = seen_by_user(data, split.test)
    users = [u for u in range(data.n_users) if test_items[u]]
    counts = np.bincount(data.item_idx[split.train], minlength=data.n_items).astype(np.float64)
    max_k = max(ks)
    n_candidates = max(n_candidates, max_k)
    popular, retrieved, ranked = [], [], []
    all_scores = user_table[users] @ item_table.T
    for row, u in enumerate(users):
        budget = min(n_candidates, data.n_items - len(train_seen[u]))
        popular.append(_top_unseen(counts, train_seen[u], min(max_k, budget)))
        candidates = _top_unseen(all_scores[row], train_seen[u], budget)
        retrieved.append(candidates)
        ranked.append(candidates[np.argsort(-score_candidates(u, candidates), kind="stable")])
    truth = [test_items[u] for u in users]
    results: dict[str, dict[str, float]] = {}
    for name, lists in (("popularity", popular), ("retrieval", retrieved), ("retrieval+ranking", ranked)):
        metrics: dict[str, float] = {}
        for k in ks:
            metrics[f"recall@{k}"], metrics[f"ndcg@{k}"] = recall_ndcg(lists, truth, k)
        results[name] = metrics
    results["_meta"] = {"users_evaluated": float(len(users)), "candidates": float(n_candidates)}
    return results


def default_context(n: int) -> np.ndarray:
    """The context used offline: home page on the web."""
    row = [schema.PAGE_TYPES.index("home"), schema.DEVICES.index("web")]
    return np.tile(np.asarray(row, dtype=np.int64), (n, 1))
