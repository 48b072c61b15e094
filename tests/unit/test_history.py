"""The bundle's user history as arrays: built from interaction pairs, saved, read back (memory-mapped or from
a user_history.json bundle), and sliced per shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.history import LEGACY_FILE, UserHistory, distinct_per_row, read_arrays

USERS = ["u0", "u1", "u2", "u3"]
ITEMS = ["a", "b", "c", "d", "e"]


def test_pairs_keep_each_users_order_and_a_user_without_interactions_has_an_empty_history():
    user_rows = np.array([2, 0, 2, 0, 2, 1])
    item_rows = np.array([4, 1, 0, 3, 4, 2])
    history = UserHistory.from_rows(USERS, ITEMS, user_rows, item_rows)
    assert dict(history) == {"u0": ["b", "d"], "u1": ["c"], "u2": ["e", "a", "e"], "u3": []}
    assert history.lengths().tolist() == [2, 1, 3, 0]
    assert "nobody" not in history


def test_saved_arrays_read_back_whole_and_memory_mapped(tmp_path: Path):
    history = UserHistory.from_rows(USERS, ITEMS, np.array([1, 1, 3]), np.array([0, 2, 4]))
    history.save(tmp_path)
    assert dict(UserHistory.read(tmp_path, USERS, ITEMS)) == dict(history)
    indptr, items = read_arrays(tmp_path)
    assert isinstance(items, np.memmap)
    assert indptr.tolist() == [0, 0, 2, 2, 3] and items.tolist() == [0, 2, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_bundle_with_a_json_history_reads_the_same(tmp_path: Path):
    (tmp_path / LEGACY_FILE).write_text(json.dumps({"u1": ["a", "c", "unknown"], "u3": ["e"], "gone": ["a"]}))
    (tmp_path / "users.json").write_text(json.dumps(USERS))
    (tmp_path / "items.json").write_text(json.dumps(ITEMS))
    history = UserHistory.read(tmp_path, USERS, ITEMS)
    assert dict(history) == {"u0": [], "u1": ["a", "c"], "u2": [], "u3": ["e"]}  # unknown ids dropped
    indptr, items = read_arrays(tmp_path)
    assert indptr.tolist() == history.indptr.tolist() and items.tolist() == history.item_rows.tolist()


def test_distinct_per_row_equals_a_set_per_user():
    rng = np.random.default_rng(3)
    n_users, n_items = 300, 50
    user_rows = rng.integers(0, n_users, 5000)
    history = UserHistory.from_rows([str(u) for u in range(n_users)], [str(i) for i in range(n_items)], user_rows,
                                    rng.integers(0, n_items, 5000))  # fmt: skip
    rows = np.array([5, 0, 299, 17, 17, 120])
    indptr, items = distinct_per_row(history.indptr, history.item_rows, rows)
    for k, row in enumerate(rows.tolist()):
        assert items[indptr[k] : indptr[k + 1]].tolist() == sorted(set(history.rows_of(row).tolist()))
