"""Every user's interaction history, stored as two arrays over bundle rows (compressed sparse rows).

``item_rows[indptr[r]:indptr[r + 1]]`` are the item rows user row ``r`` interacted with, in the order of
the data set. At 1M users with ~120 interactions each that is 0.5 GB of int32 on disk and in memory, where
a JSON object of id strings took several GB to write and parse; a pre-compute process memory-maps both
files and copies only its own users' slices.

The bundle keeps them as ``user_history_indptr.npy`` and ``user_history_items.npy``. Bundles that hold a
``user_history.json`` (user id -> item ids) read as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

INDPTR_FILE = "user_history_indptr.npy"
ITEMS_FILE = "user_history_items.npy"
LEGACY_FILE = "user_history.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write via a temporary file and rename: a crash never leaves half an array behind."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    tmp.replace(path)


class UserHistory(Mapping[str, list[str]]):
    """User id -> the item ids of their history (empty for a user without one), a ``Mapping`` over the
    bundle's users, with the arrays themselves for code that works on rows."""

    def __init__(self, user_ids: Sequence[str], item_ids: Sequence[str], indptr: np.ndarray, item_rows: np.ndarray):
        if len(indptr) != len(user_ids) + 1:
            raise ValueError(f"the history has {len(indptr) - 1} users, but the id list has {len(user_ids)}")
        self.user_ids = user_ids
        self.item_ids = item_ids
        self.indptr = indptr
        self.item_rows = item_rows
        self._row: dict[str, int] | None = None

    @classmethod
    def from_rows(
        cls, user_ids: Sequence[str], item_ids: Sequence[str], user_rows: np.ndarray, item_rows: np.ndarray
    ) -> UserHistory:
        """From (user row, item row) pairs in data order; each user's items keep that order."""
        order = np.argsort(user_rows, kind="stable")
        counts = np.bincount(user_rows, minlength=len(user_ids))
        indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(user_ids, item_ids, indptr, np.asarray(item_rows, dtype=np.int32)[order])

    @classmethod
    def from_dict(
        cls, user_ids: Sequence[str], item_ids: Sequence[str], history: Mapping[str, Sequence[str]]
    ) -> UserHistory:
        """From user id -> item ids; users and items missing from the id lists are dropped."""
        item_row = {item: r for r, item in enumerate(item_ids)}
        rows = [[item_row[i] for i in history.get(u, ()) if i in item_row] for u in user_ids]
        indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        flat = np.fromiter((r for user in rows for r in user), dtype=np.int32, count=int(indptr[-1]))
        return cls(user_ids, item_ids, indptr, flat)

    @classmethod
    def read(cls, folder: Path, user_ids: Sequence[str], item_ids: Sequence[str]) -> UserHistory:
        if not (folder / INDPTR_FILE).is_file() and (folder / LEGACY_FILE).is_file():  # a user_history.json bundle
            return cls.from_dict(user_ids, item_ids, json.loads((folder / LEGACY_FILE).read_text()))
        indptr, items = read_arrays(folder, mmap=False)
        return cls(user_ids, item_ids, indptr, items)

    def save(self, folder: Path) -> None:
        _save_npy(folder / ITEMS_FILE, np.asarray(self.item_rows, dtype=np.int32))
        _save_npy(folder / INDPTR_FILE, np.asarray(self.indptr, dtype=np.int64))

    def lengths(self) -> np.ndarray:
        """Interactions per user row."""
        return np.diff(self.indptr)

    def rows_of(self, row: int) -> np.ndarray:
        return self.item_rows[self.indptr[row] : self.indptr[row + 1]]

    def _user_row(self, user: str) -> int:
        if self._row is None:
            self._row = {u: r for r, u in enumerate(self.user_ids)}
        return self._row[user]

    def items_of(self, row: int) -> list[str]:
        """The item ids of user row ``row``'s history, in order."""
        return [self.item_ids[i] for i in self.rows_of(row).tolist()]

    def __getitem__(self, user: str) -> list[str]:
        return self.items_of(self._user_row(user))

    def __iter__(self) -> Iterator[str]:
        return iter(self.user_ids)

    def __len__(self) -> int:
        return len(self.user_ids)


def read_arrays(folder: Path, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A bundle's history arrays (indptr, item rows), memory-mapped unless ``mmap`` is false (a bundle with
    ``user_history.json`` instead: converted, in memory)."""
    if not (folder / INDPTR_FILE).is_file() and (folder / LEGACY_FILE).is_file():
        user_ids, item_ids = (json.loads((folder / name).read_text()) for name in ("users.json", "items.json"))
        history = UserHistory.read(folder, user_ids, item_ids)
        return history.indptr, history.item_rows
    if mmap:
        return np.load(folder / INDPTR_FILE, mmap_mode="r"), np.load(folder / ITEMS_FILE, mmap_mode="r")
    return np.load(folder / INDPTR_FILE), np.load(folder / ITEMS_FILE)


def distinct_per_row(indptr: np.ndarray, item_rows: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct item rows (ascending) of each user row in ``rows``, as CSR over ``rows``: only these
    users' slices are read, so ``item_rows`` may be memory-mapped."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray(indptr[rows], dtype=np.int64)
    counts = np.asarray(indptr[rows + 1], dtype=np.int64) - starts
    first = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    positions = np.repeat(starts - first[:-1], counts) + np.arange(first[-1], dtype=np.int64)
    items = np.asarray(item_rows[positions], dtype=np.int64)
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    order = np.lexsort((items, owner))
    items, owner = items[order], owner[order]
    keep = np.ones(len(items), dtype=bool)
    keep[1:] = (items[1:] != items[:-1]) | (owner[1:] != owner[:-1])
    items, owner = items[keep], owner[keep]
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=len(rows)), out=out[1:])
    return out, items
