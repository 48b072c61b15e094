"""The in-process item rows (orchestrator/store/item_rows.py) over a small fake of the store seam."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from orchestrator.store import Kind, Lookup
from orchestrator.store.item_rows import LocalItemEmbeddings, LocalRows, read_through


class FakeEmbeddings:
    """An EmbeddingStore over a dict; records every batch it is asked for. ``down`` ids answer unavailable."""

    def __init__(self, rows: dict[str, np.ndarray], down: frozenset[str] = frozenset()) -> None:
        self.rows = rows
        self.down = down
        self.asked: list[tuple[Kind, list[str]]] = []

    async def get_batch(self, kind: Kind, ids: Sequence[str]) -> Lookup:
        self.asked.append((kind, list(ids)))
        matrix = np.full((len(ids), 2), np.nan, dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        unavailable = np.array([i in self.down for i in ids], dtype=bool)
        for k, i in enumerate(ids):
            if i in self.rows and i not in self.down:
                matrix[k], found[k] = self.rows[i], True
        return Lookup(matrix, found, unavailable, ("shard-1",) if unavailable.any() else ())

    async def set_batch(self, kind: Kind, ids: Sequence[str], matrix: np.ndarray) -> None:
        for i, row in zip(ids, matrix, strict=True):
            self.rows[i] = row


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def catalogue(n: int) -> dict[str, np.ndarray]:
    return {str(i): np.array([i, -i], dtype=np.float32) for i in range(n)}


async def test_a_second_read_asks_the_store_only_for_what_it_lacks():
    inner = FakeEmbeddings(catalogue(10))
    store = LocalItemEmbeddings(inner, LocalRows(100, 60.0, "item_embeddings"))
    first = await store.get_batch("item", ["3", "1", "4"])
    second = await store.get_batch("item", ["4", "9", "1", "5"])
    assert inner.asked == [("item", ["3", "1", "4"]), ("item", ["9", "5"])]
    np.testing.assert_array_equal(first.matrix, [[3, -3], [1, -1], [4, -4]])
    np.testing.assert_array_equal(second.matrix, [[4, -4], [9, -9], [1, -1], [5, -5]])
    assert second.found.all() and not second.unavailable.any()
    third = await store.get_batch("item", ["5", "9", "3"])
    assert len(inner.asked) == 2  # all held: no read
    np.testing.assert_array_equal(third.matrix, [[5, -5], [9, -9], [3, -3]])


async def test_misses_and_unavailable_rows_are_reported_and_asked_again():
    inner = FakeEmbeddings(catalogue(5), down=frozenset({"2"}))
    store = LocalItemEmbeddings(inner, LocalRows(100, 60.0, "item_embeddings"))
    await store.get_batch("item", ["0"])
    got = await store.get_batch("item", ["0", "ghost", "2"])
    assert got.found.tolist() == [True, False, False]
    assert got.unavailable.tolist() == [False, False, True]
    assert got.down == ("shard-1",)
    assert np.isnan(got.matrix[1:]).all()  # the contract: a miss is NaN, never zero-filled
    inner.down = frozenset()
    again = await store.get_batch("item", ["ghost", "2"])
    assert inner.asked[-1] == ("item", ["ghost", "2"])
    assert again.found.tolist() == [False, True]


async def test_the_least_recently_read_row_is_evicted_first():
    inner = FakeEmbeddings(catalogue(10))
    store = LocalItemEmbeddings(inner, LocalRows(3, 60.0, "item_embeddings"))
    await store.get_batch("item", ["0", "1", "2"])
    await store.get_batch("item", ["0"])  # read again: now the most recent
    await store.get_batch("item", ["3"])  # evicts 1, the least recently read
    inner.asked.clear()
    got = await store.get_batch("item", ["0", "2", "3", "1"])
    assert inner.asked == [("item", ["1"])]
    np.testing.assert_array_equal(got.matrix, [[0, 0], [2, -2], [3, -3], [1, -1]])
    assert len(store.rows) == 3


async def test_a_row_past_its_lifetime_is_read_again():
    clock = Clock()
    inner = FakeEmbeddings(catalogue(3))
    store = LocalItemEmbeddings(inner, LocalRows(10, 30.0, "item_embeddings", clock=clock))
    await store.get_batch("item", ["0", "1"])
    clock.now += 20
    await store.get_batch("item", ["1"])  # a hit does not renew the lifetime
    inner.rows["1"] = np.array([100, 100], dtype=np.float32)
    clock.now += 15
    got = await store.get_batch("item", ["0", "1"])
    assert inner.asked[-1] == ("item", ["0", "1"])
    np.testing.assert_array_equal(got.matrix, [[0, 0], [100, 100]])


async def test_user_rows_go_straight_through_and_writes_drop_what_is_held():
    inner = FakeEmbeddings(catalogue(3))
    store = LocalItemEmbeddings(inner, LocalRows(10, 60.0, "item_embeddings"))
    await store.get_batch("user", ["1"])
    await store.get_batch("user", ["1"])
    assert inner.asked == [("user", ["1"]), ("user", ["1"])]
    await store.get_batch("item", ["1"])
    await store.set_batch("item", ["1"], np.array([[7, 7]], dtype=np.float32))
    got = await store.get_batch("item", ["1"])
    np.testing.assert_array_equal(got.matrix, [[7, 7]])


async def test_rows_stay_right_as_the_slots_grow_and_wrap():
    rows = LocalRows(3000, 60.0, "item_embeddings")
    inner = FakeEmbeddings(catalogue(5000))
    ids = [str(i) for i in range(2500)]
    await read_through(rows, ids, lambda missing: inner.get_batch("item", missing))
    got = await read_through(rows, ids[::-1], lambda missing: inner.get_batch("item", missing))
    assert len(inner.asked) == 1
    np.testing.assert_array_equal(got.matrix[:, 0], np.arange(2499, -1, -1))
    more = [str(i) for i in range(2500, 5000)]  # past capacity: the oldest make room
    got = await read_through(rows, more, lambda missing: inner.get_batch("item", missing))
    np.testing.assert_array_equal(got.matrix[:, 0], np.arange(2500, 5000))
    assert len(rows) == 3000
    hit, held = rows.read(more)
    assert hit.all()
    np.testing.assert_array_equal(held[:, 0], np.arange(2500, 5000))


def test_capacity_below_one_is_refused():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        LocalRows(0, 60.0, "item_embeddings")
