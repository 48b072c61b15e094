"""Interaction data: the MovieLens 100K format, a seeded synthetic generator that writes it, and the
per-user temporal split used for evaluation.

Ids are strings everywhere (``"1"``, ``"2"``, ...), as MovieLens numbers them; row indices into the
embedding tables are an internal detail of this module's ``Dataset``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import DataFileError, MissingDataError
from orchestrator import schema

MOVIELENS_DIR_ENV = "RECSERVE_MOVIELENS_DIR"
DEFAULT_MOVIELENS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "movielens-100k"
MOVIELENS_FILES = ("u.data", "u.item", "u.user")
N_GENRE_FLAGS = 19


def movielens_dir() -> Path:
    """Where the real MovieLens 100K lives: $RECSERVE_MOVIELENS_DIR, else ../shared/data/movielens-100k."""
    return Path(os.environ.get(MOVIELENS_DIR_ENV, str(DEFAULT_MOVIELENS_DIR)))


@dataclass
class Dataset:
    """Users, items, their static categorical features and the interactions between them."""

    name: str
    user_ids: list[str]
    item_ids: list[str]
    user_features: np.ndarray  # int64 [n_users, len(schema.USER_FEATURES)]
    item_genre_year: np.ndarray  # int64 [n_items, 2]; popularity is derived from training data
    user_idx: np.ndarray  # int64 [n_interactions]
    item_idx: np.ndarray  # int64 [n_interactions]
    rating: np.ndarray  # float32 [n_interactions]
    timestamp: np.ndarray  # int64 [n_interactions]

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return len(self.user_idx)


@dataclass
class Split:
    """Row masks over a dataset's interactions: train is each user's earliest, test their latest."""

    train: np.ndarray  # bool [n_interactions]
    test: np.ndarray  # bool [n_interactions]


def temporal_split(data: Dataset, test_fraction: float = 0.2, min_test: int = 1) -> Split:
    """Per user, hold out the latest ``test_fraction`` of interactions (at least ``min_test``).

    Users with fewer than two interactions stay entirely in train: they cannot be evaluated.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.lexsort((data.timestamp, data.user_idx))
    users_sorted = data.user_idx[order]
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    test = np.zeros(data.n_interactions, dtype=bool)
    for start, end in zip(starts, ends, strict=True):
        count = end - start
        if count < 2:
            continue
        n_test = min(count - 1, max(min_test, round(count * test_fraction)))
        test[order[end - n_test : end]] = True
    return Split(train=~test, test=test)


# --------------------------------------------------------------------------------------------------
# MovieLens 100K format


def _bucket(value: float, lower_bounds: tuple[int, ...]) -> int:
    """1-based bucket of ``value`` by lower bounds; 0 stays reserved for unknown."""
    return int(np.searchsorted(np.asarray(lower_bounds), value, side="right"))


def _read_lines(path: Path, encoding: str) -> list[str]:
    if not path.is_file():
        raise MissingDataError(path, "expected a MovieLens 100K folder with u.data, u.item and u.user")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataFileError(path, None, f"{encoding} text", f"undecodable bytes ({exc.reason})") from exc
    return [line for line in text.splitlines() if line.strip()]


def _read_users(path: Path) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    rows: list[tuple[int, int, int]] = []
    for number, line in enumerate(_read_lines(path, "latin-1"), start=1):
        fields = line.split("|")
        if len(fields) != 5:
            raise DataFileError(path, number, "5 '|'-separated fields id|age|gender|occupation|zip", line)
        user_id, age, gender, occupation, _zip = fields
        if not user_id.strip():
            raise DataFileError(path, number, "a user id", "an empty field")
        try:
            age_bucket = _bucket(int(age), schema.AGE_BUCKETS)
        except ValueError:
            raise DataFileError(path, number, "an integer age", repr(age)) from None
        gender_idx = {"F": 1, "M": 2}.get(gender, 0)
        occupation_idx = schema.context_index(schema.OCCUPATIONS, occupation)
        ids.append(user_id.strip())
        rows.append((age_bucket, gender_idx, occupation_idx))
    if len(set(ids)) != len(ids):
        raise DataFileError(path, None, "unique user ids", f"{len(ids) - len(set(ids))} duplicates")
    return ids, np.asarray(rows, dtype=np.int64).reshape(-1, len(schema.USER_FEATURES))


def _read_items(path: Path) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    rows: list[tuple[int, int]] = []
    for number, line in enumerate(_read_lines(path, "latin-1"), start=1):
        fields = line.split("|")
        if len(fields) != 5 + N_GENRE_FLAGS:
            raise DataFileError(path, number, f"{5 + N_GENRE_FLAGS} '|'-separated fields", f"{len(fields)}")
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataFileError(path, number, "19 genre flags of 0 or 1", "|".join(flags))
        # Flag 0 is MovieLens' own "unknown" genre; ours is index 0 too, so flag k maps to index k.
        genre = next((k for k, flag in enumerate(flags) if flag == "1"), 0)
        year_text = fields[2].strip()[-4:]
        year_bucket = _bucket(int(year_text), schema.YEAR_BUCKETS) if year_text.isdigit() else 0
        ids.append(fields[0].strip())
        rows.append((genre, year_bucket))
    if len(set(ids)) != len(ids):
        raise DataFileError(path, None, "unique item ids", f"{len(ids) - len(set(ids))} duplicates")
    return ids, np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def load_movielens(folder: Path, name: str = "movielens-100k") -> Dataset:
    """Read a MovieLens 100K folder (``u.data``, ``u.item``, ``u.user``), checking every line."""
    folder = Path(folder)
    user_ids, user_features = _read_users(folder / "u.user")
    item_ids, item_genre_year = _read_items(folder / "u.item")
    user_row = {uid: i for i, uid in enumerate(user_ids)}
    item_row = {iid: i for i, iid in enumerate(item_ids)}
    path = folder / "u.data"
    lines = _read_lines(path, "latin-1")
    users = np.empty(len(lines), dtype=np.int64)
    items = np.empty(len(lines), dtype=np.int64)
    ratings = np.empty(len(lines), dtype=np.float32)
    stamps = np.empty(len(lines), dtype=np.int64)
    for k, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataFileError(path, k + 1, "4 tab-separated fields user item rating timestamp", line)
        user, item, rating, stamp = fields
        if user not in user_row:
            raise DataFileError(path, k + 1, "a user id listed in u.user", repr(user))
        if item not in item_row:
            raise DataFileError(path, k + 1, "an item id listed in u.item", repr(item))
        try:
            ratings[k] = float(rating)
            stamps[k] = int(stamp)
        except ValueError:
            raise DataFileError(path, k + 1, "a numeric rating and an integer timestamp", line) from None
        users[k] = user_row[user]
        items[k] = item_row[item]
    if len(lines) == 0:
        raise DataFileError(path, None, "at least one interaction", "an empty file")
    return Dataset(name, user_ids, item_ids, user_features, item_genre_year, users, items, ratings, stamps)


# --------------------------------------------------------------------------------------------------
# Synthetic data (the embedded default): written in the MovieLens format, so one loader reads both.


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic generator. Defaults give a MovieLens-100K-sized data set."""

    n_users: int = 1000
    n_items: int = 1700
    mean_interactions_per_user: int = 100
    min_interactions_per_user: int = 20
    zipf_exponent: float = 1.0
    latent_dim: int = 16
    seed: int = 7

    def validate(self) -> None:
        if self.n_users < 2 or self.n_items < 2:
            raise ValueError(f"n_users and n_items must be >= 2, got {self.n_users}, {self.n_items}")
        if not 1 <= self.min_interactions_per_user <= self.n_items:
            raise ValueError(
                f"min_interactions_per_user must be in 1..n_items ({self.n_items}), "
                f"got {self.min_interactions_per_user}"
            )


def generate_synthetic(folder: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a seeded synthetic data set as MovieLens files into ``folder``; returns ``folder``.

    Items get Zipf popularity and a latent taste vector; each user's taste mixes a latent vector and
    their categorical features, so both towers and the ranker have real signal to learn.
    """
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = np.arange(1, len(schema.GENRES))
    item_genre = rng.choice(genres, size=spec.n_items)
    genre_vectors = rng.normal(size=(len(schema.GENRES), spec.latent_dim))
    item_latent = genre_vectors[item_genre] + 0.7 * rng.normal(size=(spec.n_items, spec.latent_dim))
    item_year = rng.integers(1930, 2024, size=spec.n_items)
    popularity = 1.0 / np.arange(1, spec.n_items + 1) ** spec.zipf_exponent
    rng.shuffle(popularity)

    occupations = schema.OCCUPATIONS[1:]
    ages = rng.integers(13, 75, size=spec.n_users)
    genders = rng.choice(["F", "M"], size=spec.n_users)
    user_occupation = rng.integers(0, len(occupations), size=spec.n_users)
    occupation_vectors = rng.normal(size=(len(occupations), spec.latent_dim))
    user_latent = occupation_vectors[user_occupation] * 0.5 + rng.normal(size=(spec.n_users, spec.latent_dim))

    counts = np.clip(
        rng.lognormal(np.log(spec.mean_interactions_per_user), 0.6, size=spec.n_users).astype(int),
        spec.min_interactions_per_user,
        spec.n_items // 2 if spec.n_items >= 2 * spec.min_interactions_per_user else spec.n_items,
    )
    start = 880_000_000
    with (folder / "u.data").open("w") as out:
        for u in range(spec.n_users):
            affinity = item_latent @ user_latent[u] / np.sqrt(spec.latent_dim)
            logits = np.log(popularity) + 1.5 * affinity
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            chosen = rng.choice(spec.n_items, size=int(counts[u]), replace=False, p=probs)
            stamps = np.sort(start + rng.integers(0, 20_000_000, size=len(chosen)))
            ratings = np.clip(np.round(3.2 + 1.2 * affinity[chosen] + rng.normal(0, 0.7, len(chosen))), 1, 5)
            for item, rating, stamp in zip(chosen, ratings, stamps, strict=True):
                out.write(f"{u + 1}\t{item + 1}\t{int(rating)}\t{int(stamp)}\n")
    with (folder / "u.user").open("w") as out:
        for u in range(spec.n_users):
            out.write(f"{u + 1}|{ages[u]}|{genders[u]}|{occupations[user_occupation[u]]}|00000\n")
    with (folder / "u.item").open("w", encoding="latin-1") as out:
        for i in range(spec.n_items):
            flags = ["0"] * N_GENRE_FLAGS
            flags[int(item_genre[i])] = "1"
            out.write(f"{i + 1}|Item {i + 1} ({item_year[i]})|01-Jan-{item_year[i]}||http://x|{'|'.join(flags)}\n")
    return folder


def popularity_buckets(item_counts: np.ndarray) -> np.ndarray:
    """Decile (1..10) of each item's training count among items seen at least once; 0 for unseen."""
    buckets = np.zeros(len(item_counts), dtype=np.int64)
    seen = item_counts > 0
    if seen.any():
        ranks = np.argsort(np.argsort(item_counts[seen], kind="stable"), kind="stable")
        buckets[seen] = 1 + (ranks * schema.POPULARITY_BUCKETS) // int(seen.sum())
    return buckets
