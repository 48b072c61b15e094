"""Offline evaluation on the held-out (latest) interactions: Recall@K and NDCG@K for retrieval alone,
retrieval + ranking, and the popularity baseline, on every user with held-out items or, past
``MAX_EVAL_USERS``, a seeded sample of them: what ``python -m export all`` records in a bundle.

The temporal protocol (a global time cutoff too, and the session-aware model as it is served) is
``export/temporal_eval.py`` (docs/EVALUATION.md); both use the metrics here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from export.data import Dataset, Split
from export.topk import UserItems, top_k
from orchestrator import schema

# Past this many users with held-out items, evaluation takes a seeded sample of this many.
MAX_EVAL_USERS = 10_000

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


def hits_at(recommended: np.ndarray, truth: UserItems, users: np.ndarray) -> np.ndarray:
    """bool ``[len(users), L]``: whether ``recommended[j, r]`` is one of ``truth[users[j]]``.

    ``recommended`` is an int64 ``[len(users), L]`` array of item rows, best first, -1 for padding
    (never a hit). One sorted search over (position, item) keys, no Python set per user."""
    if recommended.shape[0] != len(users):
        raise ValueError(f"recommended has {recommended.shape[0]} rows but users has {len(users)} entries")
    users = np.asarray(users, dtype=np.int64)
    lengths = truth.counts()[users]
    truth_items = np.concatenate([truth[int(u)] for u in users]) if lengths.sum() else np.zeros(0, np.int64)
    width = int(max(truth_items.max(initial=-1), recommended.max(initial=-1))) + 1
    truth_keys = np.repeat(np.arange(len(users), dtype=np.int64), lengths) * width + truth_items
    keys = np.arange(len(users), dtype=np.int64)[:, None] * width + recommended
    return np.isin(keys, truth_keys) & (recommended >= 0)


def user_recall_ndcg(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user (a row of ``hits``, as ``hits_at`` gives it): Recall@k (hits in the top k over the user's
    relevant items) and NDCG@k (binary gains, log2 discounts, the ideal list puts min(relevant, k) hits
    first): the same definitions as ``recall_ndcg``, per user and vectorised. Every user must have at least
    one relevant item."""
    if hits.shape[0] != len(n_relevant):
        raise ValueError(f"hits has {hits.shape[0]} rows but n_relevant has {len(n_relevant)} entries")
    if len(n_relevant) and int(np.min(n_relevant)) < 1:
        raise ValueError("every user must have at least one relevant item, found a user with none")
    top = hits[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k) - 1]
    recall = top.sum(axis=1) / n_relevant
    ndcg = (top * discounts[: top.shape[1]]).sum(axis=1) / ideal
    return recall.astype(np.float64), ndcg.astype(np.float64)


def seen_by_user(data: Dataset, mask: np.ndarray) -> UserItems:
    """Each user's distinct items among the interactions in ``mask``."""
    return UserItems.of(data.user_idx[mask], data.item_idx[mask], data.n_users)


def sample_users(eligible: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """``eligible`` itself, or a seeded sample of ``max_users`` of them (sorted) when there are more."""
    if max_users is None or len(eligible) <= max_users:
        return eligible
    return np.sort(np.random.default_rng(seed).choice(eligible, size=max_users, replace=False))


def evaluate(
    data: Dataset,
    split: Split,
    user_table: np.ndarray,
    item_table: np.ndarray,
    score_candidates: ScoreFn,
    ks: tuple[int, ...] = (10, 50),
    n_candidates: int = 100,
    max_users: int | None = MAX_EVAL_USERS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Returns ``{"popularity"|"retrieval"|"retrieval+ranking": {"recall@K": .., "ndcg@K": ..}}`` and
    ``"_meta"``: how many users were evaluated (every user with held-out items, or a seeded sample of
    ``max_users`` of them), out of how many, and the candidates per user.

    Retrieval scores the evaluated users a chunk at a time (``export.topk``), never users x items."""
    train_seen = seen_by_user(data, split.train)
    test_items = seen_by_user(data, split.test)
    eligible = np.flatnonzero(test_items.counts() > 0)
    users = sample_users(eligible, max_users, seed)
    counts = np.bincount(data.item_idx[split.train], minlength=data.n_items).astype(np.float64)
    by_popularity = np.argsort(-counts, kind="stable")
    max_k = max(ks)
    n_candidates = max(n_candidates, max_k)
    popular, retrieved, ranked = [], [], []
    for rows, top in top_k(user_table, item_table, n_candidates, users, exclude=train_seen, progress="evaluation"):
        for u, best in zip(rows.tolist(), top, strict=True):
            seen = train_seen[u]
            budget = min(n_candidates, data.n_items - len(seen))
            prefix = by_popularity[: min(data.n_items, max_k + len(seen))]
            popular.append(prefix[~np.isin(prefix, seen)][: min(max_k, budget)])
            candidates = best[:budget]
            retrieved.append(candidates)
            ranked.append(candidates[np.argsort(-score_candidates(u, candidates), kind="stable")])
    truth = [set(test_items[u].tolist()) for u in users.tolist()]
    results: dict[str, dict[str, float]] = {}
    for name, lists in (("popularity", popular), ("retrieval", retrieved), ("retrieval+ranking", ranked)):
        metrics: dict[str, float] = {}
        for k in ks:
            metrics[f"recall@{k}"], metrics[f"ndcg@{k}"] = recall_ndcg(lists, truth, k)
        results[name] = metrics
    results["_meta"] = {
        "users_evaluated": float(len(users)),
        "users_eligible": float(len(eligible)),
        "sample_seed": float(seed),
        "candidates": float(n_candidates),
    }
    return results


def default_context(n: int) -> np.ndarray:
    """The context used offline: home page on the web."""
    row = [schema.PAGE_TYPES.index("home"), schema.DEVICES.index("web")]
    return np.tile(np.asarray(row, dtype=np.int64), (n, 1))
