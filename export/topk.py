"""Top-k items per user by inner product, a chunk of users at a time: never users x items at once.

Hard-negative mining (``export.train``) and offline evaluation (``export.evaluate``) both need each
user's best-scoring items. Scoring every user against every item in one matrix, then sorting it, costs
users x items floats and as many int64 indices (7.5 + 14.9 GiB at 100K x 20K: a MemoryError on a 24 GB
machine); here a chunk of users is scored at a time, with a bounded number of scores in memory, and only
each chunk's top k is kept (``numpy.argpartition``, then the k sorted). The compute stays users x items x
dim (it is exact search); memory does not grow with the number of users. The order is the dense one:
score descending, ties by item row ascending, so the chunked result equals
``np.argsort(-scores, kind="stable")[:, :k]`` over the full matrix.

From ``HEAP_FROM_ITEMS`` items on, a chunk of a bounded score matrix holds a handful of users, each a
matrix-vector product and a partition over every item (12 users/s at 1M items); there FAISS's exact
search (``faiss.knn``: matrix products over blocks of users and items, a heap per user) takes each user's
top k + |seen|, and the seen items are dropped from it. Same result but for exact ties at the k-th score,
which either side may keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

# Scores per chunk (float32): 1M of them, 4 MiB (with the selection's temporaries ~25 MiB), whatever the
# number of users and items.
CHUNK_SCORES = 1 << 20
HEAP_FROM_ITEMS = 100_000
HEAP_CHUNK_USERS = 1024


@dataclass(frozen=True)
class UserItems:
    """Each user's items as one CSR structure (two int64 arrays), not a Python set per user."""

    indptr: np.ndarray  # int64 [n_users + 1]
    items: np.ndarray  # int64 [n_pairs], each user's items sorted and distinct

    @classmethod
    def of(cls, users: np.ndarray, items: np.ndarray, n_users: int) -> UserItems:
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        fresh = np.r_[True, (users[1:] != users[:-1]) | (items[1:] != items[:-1])]
        users, items = users[fresh], items[fresh]
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
        return cls(indptr, items.astype(np.int64))

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)


def chunk_size(n_items: int, budget: int) -> int:
    """Users per chunk so that a chunk's score matrix holds about ``budget`` floats."""
    return max(1, budget // max(1, n_items))


def _sorted_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise top ``k`` column indices of ``scores``, score descending, ties by column ascending."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, part, axis=1)
    top = np.take_along_axis(part, np.lexsort((part, -picked), axis=1), axis=1)
    # A column tied with the k-th score may have been left out in favour of a later one: such rows
    # (rare with float scores; every row with fewer than k finite scores) take the full stable sort.
    tied = np.flatnonzero((scores >= picked.min(axis=1, keepdims=True)).sum(axis=1) > k)
    if len(tied):
        top[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
    return top


def top_k(
    user_table: np.ndarray,
    item_table: np.ndarray,
    k: int,
    users: np.ndarray | None = None,
    exclude: UserItems | None = None,
    budget: int | None = None,
    progress: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(user rows, top)`` per chunk of ``users`` (default: all, in order), ``top`` an int64
    ``[len(rows), k]`` array of item rows, best first. Items in ``exclude[user]`` are never returned;
    when fewer than ``k`` items remain for a user, their row is padded with -1. A chunk scores about
    ``budget`` (default ``CHUNK_SCORES``) user-item pairs at once. ``progress``: a progress bar's label
    (users done), none without one."""
    n_items = item_table.shape[0]
    k = min(k, n_items)
    rows_all = np.arange(user_table.shape[0]) if users is None else np.asarray(users, dtype=np.int64)
    bar = tqdm(total=len(rows_all), desc=progress, unit="user", mininterval=2.0, disable=progress is None)
    if n_items >= HEAP_FROM_ITEMS:
        items = np.ascontiguousarray(item_table, dtype=np.float32)
        for start in range(0, len(rows_all), HEAP_CHUNK_USERS):
            rows = rows_all[start : start + HEAP_CHUNK_USERS]
            bar.update(len(rows))
            yield rows, _heap_top(np.asarray(user_table[rows], dtype=np.float32), items, k, rows, exclude)
        bar.close()
        return
    items_t = np.ascontiguousarray(item_table, dtype=np.float32).T
    step = chunk_size(n_items, CHUNK_SCORES if budget is None else budget)
    for start in range(0, len(rows_all), step):
        rows = rows_all[start : start + step]
        scores = np.asarray(user_table[rows], dtype=np.float32) @ items_t
        if exclude is not None:
            lengths = exclude.counts()[rows]
            flat = np.concatenate([exclude[int(u)] for u in rows]) if lengths.sum() else np.zeros(0, np.int64)
            scores[np.repeat(np.arange(len(rows)), lengths), flat] = -np.inf
        top = _sorted_top(scores, k)
        if exclude is not None:
            # A user with fewer than k unseen items gets -inf columns at the end: pad them as -1.
            top = np.where(np.take_along_axis(scores, top, axis=1) == -np.inf, -1, top)
        bar.update(len(rows))
        yield rows, top
    bar.close()


def _heap_top(
    queries: np.ndarray, items: np.ndarray, k: int, rows: np.ndarray, exclude: UserItems | None
) -> np.ndarray:
    """``top_k``'s chunk through ``faiss.knn``: each user's top k + |seen| by a heap, less the seen items,
    in the dense order (score descending, ties by item row ascending); -1 past the unseen items."""
    lengths = exclude.counts()[rows] if exclude is not None else np.zeros(len(rows), dtype=np.int64)
    depth = min(len(items), k + int(lengths.max(initial=0)))
    scores, found = faiss.knn(np.ascontiguousarray(queries), items, depth, faiss.METRIC_INNER_PRODUCT)
    order = np.lexsort((found, -scores), axis=1)
    found = np.take_along_axis(found, order, axis=1)
    top = np.full((len(rows), k), -1, dtype=np.int64)
    for i, user in enumerate(rows.tolist()):
        kept = found[i] if exclude is None else found[i][~np.isin(found[i], exclude[user])]
        kept = kept[kept >= 0][:k]
        top[i, : len(kept)] = kept
    return top
