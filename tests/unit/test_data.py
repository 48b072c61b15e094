from pathlib import Path

import numpy as np
import pytest

from export import data as data_module
from export.data import (
    Dataset,
    SyntheticSpec,
    generate_synthetic,
    load_movielens,
    popularity_buckets,
    read_spec,
    temporal_split,
)
from export.errors import DataFileError, MissingDataError
from orchestrator import schema

TINY = SyntheticSpec(n_users=30, n_items=60, mean_interactions_per_user=25, min_interactions_per_user=5)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("tiny"), TINY)


def test_synthetic_is_seeded_and_movielens_shaped(tiny_folder: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", TINY)
    for name in ("u.data", "u.item", "u.user"):
        assert (tiny_folder / name).read_bytes() == (again / name).read_bytes()
    data = load_movielens(tiny_folder, "synthetic")
    assert data.user_ids[0] == "1" and data.item_ids[0] == "1"
    assert data.user_ids == [str(i) for i in range(1, TINY.n_users + 1)]
    assert all(isinstance(i, str) for i in data.item_ids)
    per_user = np.bincount(data.user_idx, minlength=data.n_users)
    assert per_user.min() >= TINY.min_interactions_per_user
    assert data.user_features.shape == (TINY.n_users, len(schema.USER_FEATURES))
    assert (data.user_features[:, 2] > 0).all()  # every occupation is known


def test_synthetic_popularity_is_skewed(tmp_path: Path) -> None:
    data = load_movielens(
        generate_synthetic(tmp_path, SyntheticSpec(n_users=200, n_items=2000, mean_interactions_per_user=30)),
        "s",
    )
    counts = np.sort(np.bincount(data.item_idx, minlength=data.n_items))[::-1]
    top_decile_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile_share > 0.4  # Zipf: the top 10% of items take far more than 10% of interactions


def test_temporal_split_holds_out_each_users_latest(tiny_folder: Path) -> None:
    data = load_movielens(tiny_folder, "synthetic")
    split = temporal_split(data, test_fraction=0.2)
    assert not (split.train & split.test).any() and (split.train | split.test).all()
    for u in range(data.n_users):
        mine = data.user_idx == u
        train_times = data.timestamp[mine & split.train]
        test_times = data.timestamp[mine & split.test]
        assert len(train_times) >= 1 and len(test_times) >= 1
        assert train_times.max() <= test_times.min()


def test_temporal_split_rejects_a_bad_fraction(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        temporal_split(load_movielens(tiny_folder), test_fraction=1.5)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("u.data", "u.item", "u.user"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_missing_file_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_folder, tmp_path / "d")
    (folder / "u.item").unlink()
    with pytest.raises(MissingDataError, match=r"u.item does not exist"):
        load_movielens(folder)


@pytest.mark.parametrize(
    ("file", "line", "message"),
    [
        ("u.data", "1\t2\tthree\t880000000\n", r"u.data:1: expected a numeric rating"),
        ("u.data", "1\t2\n", r"u.data:1: expected 4 tab-separated fields"),
        (
            "u.data",
            "1\t99999\t3\t880000000\n",
            r"u.data:1: expected an item id listed in u.item, but found '99999'",
        ),
        ("u.user", "1|old|M|writer|0\n", r"u.user:1: expected an integer age, but found 'old'"),
        ("u.item", "1|x|y\n", r"u.item:1: expected 24 '\|'-separated fields, but found 3"),
    ],
)
def test_corrupt_lines_are_named(tiny_folder: Path, tmp_path: Path, file: str, line: str, message: str) -> None:
    folder = _copy(tiny_folder, tmp_path / "d")
    original = (folder / file).read_text(encoding="latin-1").splitlines(keepends=True)
    (folder / file).write_text(line + "".join(original[1:]), encoding="latin-1")
    with pytest.raises(DataFileError, match=message):
        load_movielens(folder)


def test_an_empty_interactions_file_is_reported(tiny_folder: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_folder, tmp_path / "d")
    (folder / "u.data").write_bytes(b"")
    with pytest.raises(DataFileError, match=r"u.data: expected at least one interaction, but found an empty file"):
        load_movielens(folder)


def test_popularity_buckets_are_deciles_with_zero_for_unseen() -> None:
    counts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    buckets = popularity_buckets(counts)
    assert buckets[0] == 0
    assert list(buckets[1:]) == list(range(1, 11))


# A catalog past ``exact_items``: each user scores a candidate pool (O(interactions)), not every item.
POOLED = SyntheticSpec(n_users=300, n_items=3000, mean_interactions_per_user=30, min_interactions_per_user=5)


def test_a_large_catalog_is_drawn_from_pools_seeded_distinct_and_skewed(tmp_path: Path) -> None:
    assert POOLED.n_items > POOLED.exact_items
    first = generate_synthetic(tmp_path / "a", POOLED, progress=False)
    again = generate_synthetic(tmp_path / "b", POOLED, progress=False)
    assert (first / "u.data").read_bytes() == (again / "u.data").read_bytes()
    data = load_movielens(first, "synthetic")
    per_user = np.bincount(data.user_idx, minlength=data.n_users)
    assert per_user.min() >= POOLED.min_interactions_per_user
    pairs = data.user_idx * data.n_items + data.item_idx
    assert len(np.unique(pairs)) == len(pairs)  # without replacement
    counts = np.sort(np.bincount(data.item_idx, minlength=data.n_items))[::-1]
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.4
    # Ratings follow affinity: the users' items are far better liked than chance would make them.
    assert data.rating.mean() > 4.0


def test_a_failed_run_leaves_no_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = generate_synthetic(tmp_path / "d", TINY, progress=False)
    assert read_spec(folder) == TINY

    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of u.data

    monkeypatch.setattr(data_module, "_draw_chunk", fail)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(folder, SyntheticSpec(n_users=40, n_items=60, min_interactions_per_user=5))
    # The old u.data went first, the new one never landed, and no temporary file is left behind.
    assert not (folder / "u.data").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["spec.json", "u.item", "u.user"]


def test_prepare_dataset_regenerates_only_for_another_spec(tmp_path: Path) -> None:
    from export.pipeline import prepare_dataset

    folder = tmp_path / "data"
    first = prepare_dataset("synthetic", tmp_path, TINY, data_dir=folder)
    stamp = (folder / "u.data").stat().st_mtime_ns
    assert prepare_dataset("synthetic", tmp_path, TINY, data_dir=folder).n_interactions == first.n_interactions
    assert prepare_dataset("synthetic", tmp_path, None, data_dir=folder).n_users == TINY.n_users  # as it is
    assert (folder / "u.data").stat().st_mtime_ns == stamp
    other = SyntheticSpec(n_users=40, n_items=60, mean_interactions_per_user=25, min_interactions_per_user=5)
    assert prepare_dataset("synthetic", tmp_path, other, data_dir=folder).n_users == 40
    assert read_spec(folder) == other


def _line_by_line(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "_read_interactions_fast", lambda *args: None)
        return load_movielens(folder, "synthetic")


@pytest.mark.parametrize("ratings", ["integer", "fractional"])
def test_the_block_reader_reads_what_the_line_reader_reads(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratings: str
) -> None:
    folder = _copy(tiny_folder, tmp_path / "d")
    if ratings == "fractional":
        rows = [line.split("\t") for line in (folder / "u.data").read_text().splitlines()]
        text = "\n".join("\t".join([u, i, "3.5" if r == "4" else r, t]) for u, i, r, t in rows)
        (folder / "u.data").write_text(text)  # and no newline at the end
    monkeypatch.setattr(data_module, "READ_BLOCK_BYTES", 1000)  # many blocks, lines cut across them
    fast = data_module._read_interactions_fast(
        folder / "u.data", [str(u) for u in range(1, 31)], [str(i) for i in range(1, 61)]
    )
    assert fast is not None
    slow = _line_by_line(folder, monkeypatch)
    for got, want in zip(fast, (slow.user_idx, slow.item_idx, slow.rating, slow.timestamp), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    if ratings == "fractional":
        assert (slow.rating == 3.5).any()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("01\t2\t3\t880000000\n", r"u.data:1: expected a user id listed in u.user, but found '01'"),
        ("1\t2\t3\t880000000.0\n", r"u.data:1: expected a numeric rating and an integer timestamp"),
        ("1\t2\t3\t880000000\r\n", None),  # CRLF: the line reader takes it as it always did
    ],
)
def test_what_the_block_reader_would_read_differently_goes_line_by_line(
    tiny_folder: Path, tmp_path: Path, line: str, message: str | None
) -> None:
    folder = _copy(tiny_folder, tmp_path / "d")
    original = (folder / "u.data").read_text().splitlines(keepends=True)
    (folder / "u.data").write_bytes((line + "".join(original[1:])).encode())
    if message is None:
        assert load_movielens(folder).timestamp[0] == 880000000
    else:
        with pytest.raises(DataFileError, match=message):
            load_movielens(folder)
