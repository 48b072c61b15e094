"""Temporal evaluation: train on the past, score on what each user did next.

Three models are compared on the same users, candidates and metrics (NDCG@10, recall@50, and @10/@50
of both): popularity (training counts), the static two-tower + ranker (the models as the pipeline trains
them), and the session-aware model: the user vector blended with the vectors of the user's most recent
training interactions, through ``orchestrator.session`` (``event_weights``, ``session_vector``,
``blend_query``, ``interleave``: the functions the request path uses, so the gain measured here is the
one served), then the same retrieval and the same ranker. The request path's whole answer is the
``served`` stage (``STAGES``): the ranker given the blended query, then a share alpha of the list's places
to the candidates nearest the session; the other stages take it apart.

The split, and why there are two. "Train on the past" in serving means: the model deployed at time T
learned from nothing after T, for any user or item. ``global_cutoff_split`` is that protocol: one cutoff
T (by default the 80th percentile of timestamps), train on every interaction before T, test on each
user's interactions from T on, for users with history before T. It comes first because it is the
only one that leaks no future: the per-user split (``export.data.temporal_split``, each user's latest
20% held out) trains item vectors and popularity counts on other users' interactions from after this
user's test period (Ji et al., "A critical study on data leakage in recommender system offline
evaluation", 2023). But MovieLens users rate in bursts, mostly in one sitting: a global cutoff keeps few
users with both sides (109 of 943 in 100K, 28 of 610 in latest-small), and for them the last training
interaction is weeks before the next one, so the serving session window holds nothing. The per-user
split is what a "continuing session" looks like (98% of 100K's users come back within 30 minutes of
their last training interaction), so both are run and reported, each with its leak or its sample size
stated, and neither is mistaken for the other.

The session. For each evaluated user the request happens at their first test interaction ("now"); the
session is their ``max_events`` latest training interactions, weighted by ``event_weights`` (kind weight
halved every ``half_life_s``, nothing older than ``window_s`` before now). A log without event types
(MovieLens: ratings) has every interaction mapped to one kind, ``click``; with one kind the kind weight
cancels in the weighted mean, so only recency counts. Two session specs are run: ``serving`` (the
request path's window and half-life) and ``last-k`` (no window, no decay: the last K items equally),
which says whether recent items carry signal at all when the serving window finds no session.

Scale: users are evaluated a chunk at a time (``CHUNK_USERS``); retrieval goes through ``export.topk``
(never users x items) and the ranker scores at most ``RANK_BATCH`` (user, item) rows per forward pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.data import Dataset, Split, temporal_split
from export.evaluate import MAX_EVAL_USERS, default_context, hits_at, sample_users, seen_by_user, user_recall_ndcg
from export.topk import UserItems, top_k
from export.train import TrainConfig, TrainedModels, train
from orchestrator.config import RankingSettings, SessionSettings
from orchestrator.session import blend_query, event_weights, interleave, session_vector

log = logging.getLogger(__name__)

SPLITS = ("global", "per-user")
DEFAULT_TEST_FRACTION = 0.2
# The serving default is SessionSettings.share_percent / 100 (0.5); alpha 0 is the static model.
DEFAULT_ALPHAS = (0.25, 0.5, 0.75, 1.0)
KS = (10, 50)
# The serving path's candidates per request: what the ranker re-ranks there is what it re-ranks here.
SERVING_CANDIDATES: int = RankingSettings.model_fields["n_candidates"].default
SERVING_LIST_LENGTH: int = RankingSettings.model_fields["list_length"].default
CHUNK_USERS = 2048  # evaluated users per chunk: bounds queries, candidates and hits to O(chunk x candidates)
RANK_BATCH = 65_536  # (user, item) rows per ranker forward pass
DEFAULT_EVENT_KIND = "click"  # what an interaction of a log without event types counts as in a session

# (user rows [n], the user vectors the ranker sees [n, d], candidates [n, c] with -1 padding) -> [n, c]
RankFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SessionSpec:
    """How a user's session is rebuilt from the log (the serving path reads it from Redis)."""

    name: str
    max_events: int = SessionSettings.model_fields["max_events"].default
    """The latest this many training interactions (the request path reads the latest this many events)."""
    window_s: float = SessionSettings.model_fields["window_s"].default
    """Events older than this before the request count for nothing (math.inf: no window)."""
    half_life_s: float = SessionSettings.model_fields["half_life_s"].default
    """An event's weight halves every this many seconds of age (math.inf: no decay)."""

    def validate(self) -> None:
        if self.max_events < 1:
            raise ValueError(f"max_events must be an integer >= 1, got {self.max_events}")
        if not (self.window_s > 0 and self.half_life_s > 0):
            raise ValueError(f"window_s and half_life_s must be > 0, got {self.window_s} and {self.half_life_s}")


# ``serving``: the request path's session settings (orchestrator.config.SessionSettings' defaults);
# ``last-k``: the no-window control.
SERVING_SESSION = SessionSpec("serving")
LAST_K_SESSION = SessionSpec("last-k", window_s=math.inf, half_life_s=math.inf)
DEFAULT_SESSIONS = (SERVING_SESSION, LAST_K_SESSION)


# --------------------------------------------------------------------------------------------------
# Splits


def global_cutoff(data: Dataset, test_fraction: float = DEFAULT_TEST_FRACTION) -> int:
    """The cutoff T (epoch seconds) with about ``test_fraction`` of interactions at or after it."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    stamps = np.sort(data.timestamp)
    cutoff = int(stamps[min(len(stamps) - 1, math.ceil((1.0 - test_fraction) * len(stamps)))])
    if cutoff <= int(stamps[0]):
        raise ValueError(f"expected interactions before the cutoff {cutoff}, but every timestamp is at or after it")
    return cutoff


def global_cutoff_split(data: Dataset, cutoff: int) -> Split:
    """Train: every interaction before ``cutoff``. Test: interactions at or after it of users with at least
    one training interaction (a user first seen after T is a cold start: no user vector, no session; left
    out, neither trained on nor tested). Nothing from T on is in train, for any user or item."""
    train_mask = data.timestamp < cutoff
    known = np.zeros(data.n_users, dtype=bool)
    known[data.user_idx[train_mask]] = True
    return Split(train=train_mask, test=~train_mask & known[data.user_idx])


def make_split(data: Dataset, kind: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[Split, int | None]:
    """The split of ``kind`` (one of ``SPLITS``) and its global cutoff (None for the per-user split)."""
    if kind == "global":
        cutoff = global_cutoff(data, test_fraction)
        return global_cutoff_split(data, cutoff), cutoff
    if kind == "per-user":
        return temporal_split(data, test_fraction), None
    raise ValueError(f"split must be one of {list(SPLITS)}, got {kind!r}")


def check_past_only(data: Dataset, split: Split) -> None:
    """Raises ValueError unless train and test are disjoint and, for every user, no training interaction
    is later than that user's first test interaction."""
    if (split.train & split.test).any():
        raise ValueError(f"expected disjoint train and test, but {int((split.train & split.test).sum())} rows are both")
    last_train = np.full(data.n_users, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last_train, data.user_idx[split.train], data.timestamp[split.train])
    first_test = np.full(data.n_users, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_test, data.user_idx[split.test], data.timestamp[split.test])
    leaks = np.flatnonzero(last_train > first_test)
    if len(leaks):
        u = int(leaks[0])
        raise ValueError(
            f"expected each user's training interactions to precede their test ones, but {len(leaks)} users "
            f"train on later ones (user {data.user_ids[u]!r}: train at {last_train[u]}, test from {first_test[u]})"
        )


# --------------------------------------------------------------------------------------------------
# Sessions


@dataclass(frozen=True)
class History:
    """Each user's training interactions in time order (CSR over interaction rows) and the time of their
    first test interaction: the moment of the request being evaluated."""

    indptr: np.ndarray  # int64 [n_users + 1]
    rows: np.ndarray  # int64 [n_train]: interaction rows, by user then timestamp
    now_s: np.ndarray  # int64 [n_users]: first test timestamp (int64 max when the user has none)

    @classmethod
    def of(cls, data: Dataset, split: Split) -> History:
        train_rows = np.flatnonzero(split.train)
        order = np.lexsort((data.timestamp[train_rows], data.user_idx[train_rows]))
        rows = train_rows[order]
        indptr = np.zeros(data.n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(data.user_idx[rows], minlength=data.n_users), out=indptr[1:])
        now_s = np.full(data.n_users, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(now_s, data.user_idx[split.test], data.timestamp[split.test])
        return cls(indptr, rows, now_s)

    def latest(self, user: int, k: int) -> np.ndarray:
        """The user's latest ``k`` training interaction rows, oldest first."""
        end = int(self.indptr[user + 1])
        return self.rows[max(int(self.indptr[user]), end - k) : end]


def event_kinds(data: Dataset, rows: np.ndarray, default_kind: str = DEFAULT_EVENT_KIND) -> list[str]:
    """The session event kind of each interaction row: its event type when the log has them (a kind the
    session does not weigh, such as a purchase, then counts for nothing), else ``default_kind``."""
    if data.event_type is None:
        return [default_kind] * len(rows)
    return [data.event_types[int(t)] for t in data.event_type[rows]]


def session_queries(
    data: Dataset,
    history: History,
    users: np.ndarray,
    user_table: np.ndarray,
    item_table: np.ndarray,
    spec: SessionSpec,
    alphas: Sequence[float],
    default_kind: str = DEFAULT_EVENT_KIND,
) -> tuple[dict[float, np.ndarray], np.ndarray, np.ndarray]:
    """``({alpha: query vectors [len(users), d]}, has_session [len(users)], session vectors [len(users), d])``:
    each user's vector blended with their session's, as the request path blends them; a user with no
    session weight left (nothing in the window) keeps their own vector (and a session vector of zeros)."""
    spec.validate()
    dim = user_table.shape[1]
    queries = {alpha: np.empty((len(users), dim), dtype=np.float32) for alpha in alphas}
    has_session = np.zeros(len(users), dtype=bool)
    sessions = np.zeros((len(users), dim), dtype=np.float64)
    for j, user in enumerate(np.asarray(users).tolist()):
        rows = history.latest(user, spec.max_events)
        events = list(zip(event_kinds(data, rows, default_kind), (data.timestamp[rows] * 1000).tolist(), strict=True))
        weights = event_weights(events, int(history.now_s[user]) * 1000, spec.window_s, spec.half_life_s)
        session = session_vector(item_table[data.item_idx[rows]], weights)
        has_session[j] = session is not None
        if session is not None:
            sessions[j] = session
        for alpha in alphas:
            query = blend_query(user_table[user], session, alpha)
            if query is None:  # unreachable: every evaluated user has a vector
                raise ValueError(f"expected a query vector for user row {user}, found none")
            queries[alpha][j] = query
    return queries, has_session, sessions


# --------------------------------------------------------------------------------------------------
# Evaluation


def ranker_rank_fn(models: TrainedModels, batch_rows: int = RANK_BATCH) -> RankFn:
    """Eager-torch ranker scores of candidates (-1: padding, scored -inf), with the offline context (home,
    web), at most ``batch_rows`` (user, item) rows per forward pass."""

    def rank(users: np.ndarray, user_vectors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        n, c = candidates.shape
        real = candidates.reshape(-1) >= 0  # padding is never scored
        items = candidates.reshape(-1)[real]
        owner = np.repeat(np.arange(n), c)[real]
        vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
        out = np.empty(len(items), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(items), batch_rows):
                part = slice(start, start + batch_rows)
                who, what = owner[part], items[part]
                out[part] = (
                    models.ranker(
                        torch.from_numpy(vectors[who]),
                        torch.from_numpy(models.item_embeddings[what]),
                        torch.from_numpy(models.user_features[users[who]]),
                        torch.from_numpy(models.item_features[what]),
                        torch.from_numpy(default_context(len(what))),
                    )
                    .numpy()
                    .reshape(-1)
                )
        scores = np.full(n * c, -np.inf, dtype=np.float32)
        scores[real] = out
        return scores.reshape(n, c)

    return rank


def rerank(rank: RankFn, users: np.ndarray, user_vectors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``candidates`` reordered by the ranker's score, best first (ties keep retrieval order; -1 last)."""
    scores = np.asarray(rank(users, user_vectors, candidates), dtype=np.float64)
    if scores.shape != candidates.shape:
        raise ValueError(
            f"the ranker returned scores of shape {scores.shape} for candidates of shape {candidates.shape}"
        )
    scores = np.where(candidates >= 0, scores, -np.inf)
    return np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind="stable"), axis=1)


@dataclass(frozen=True)
class PairScores:
    """The ranker's scores of each distinct (user, candidate) pair of several candidate lists, scored once:
    with the user's own vector a pair's score does not depend on which retrieval found it, and the
    static and every session-aware list share most of their candidates."""

    keys: np.ndarray  # int64, sorted: position in the chunk * n_items + item row
    scores: np.ndarray  # float64, one per key
    n_items: int

    @classmethod
    def of(
        cls, rank: RankFn, users: np.ndarray, vectors: np.ndarray, lists: Sequence[np.ndarray], n_items: int
    ) -> PairScores:
        positions = np.arange(len(users), dtype=np.int64)[:, None]
        keys = np.unique(np.concatenate([(positions * n_items + c)[c >= 0] for c in lists]))
        owner, items = keys // n_items, keys % n_items
        starts = np.searchsorted(owner, np.arange(len(users)))
        column = np.arange(len(keys)) - starts[owner]
        width = int(column.max(initial=-1)) + 1
        padded = np.full((len(users), width), -1, dtype=np.int64)
        padded[owner, column] = items
        scores = np.asarray(rank(users, vectors, padded), dtype=np.float64)
        if scores.shape != padded.shape:
            raise ValueError(
                f"the ranker returned scores of shape {scores.shape} for candidates of shape {padded.shape}"
            )
        return cls(keys, scores[owner, column], n_items)

    def rerank(self, candidates: np.ndarray) -> np.ndarray:
        """``candidates`` (rows: the users ``of`` was given) reordered as ``rerank`` would."""
        wanted = np.arange(len(candidates), dtype=np.int64)[:, None] * self.n_items + candidates
        at = np.clip(np.searchsorted(self.keys, wanted), 0, max(len(self.keys) - 1, 0))
        found = (candidates >= 0) & (self.keys[at] == wanted) if len(self.keys) else np.zeros(wanted.shape, bool)
        if not found[candidates >= 0].all():
            raise ValueError("expected every candidate among the scored pairs, but some were not scored")
        scores = np.where(found, self.scores[at] if len(self.keys) else 0.0, -np.inf)
        return np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind="stable"), axis=1)


def restrict(seen: UserItems, users: np.ndarray) -> UserItems:
    """``seen`` re-indexed by position in ``users``: row j holds ``seen[users[j]]``."""
    lengths = seen.counts()[users]
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = np.concatenate([seen[int(u)] for u in users]) if lengths.sum() else np.zeros(0, np.int64)
    return UserItems(indptr, items)


def retrieve(queries: np.ndarray, item_table: np.ndarray, k: int, exclude: UserItems) -> np.ndarray:
    """Top ``k`` item rows per query (``exclude`` indexed by query position), -1 padded, via ``top_k``."""
    parts = [top for _, top in top_k(queries, item_table, k, None, exclude=exclude)]
    return np.concatenate(parts) if parts else np.zeros((0, min(k, item_table.shape[0])), dtype=np.int64)


def popular_for(by_popularity: np.ndarray, seen: UserItems, users: np.ndarray, k: int) -> np.ndarray:
    """Per user, the ``k`` most popular items they have not seen (-1 padded)."""
    out = np.full((len(users), k), -1, dtype=np.int64)
    for j, user in enumerate(users.tolist()):
        mine = seen[user]
        prefix = by_popularity[: k + len(mine)]
        fresh = prefix[~np.isin(prefix, mine)][:k]
        out[j, : len(fresh)] = fresh
    return out


def session_row(variant: str, alpha: float, stage: str) -> str:
    """Row name of a session-aware result: ``session[serving] a=0.5 +ranker``."""
    return f"session[{variant}] a={alpha:g} {stage}"


# What is done with a session query's candidates: "retrieval" alone; "+ranker", ranked with the user's own
# vector (as the ranker was trained); "+ranker(query)", ranked with the blended query as the user vector
# (what the request path hands the ranker); "served", that ranking with a share alpha of the list's places
# given to the candidates nearest the session vector (orchestrator.session.interleave): the request path's
# whole session-aware answer (orchestrator/recommender.py, docs/SESSION.md).
STAGES = ("retrieval", "+ranker", "+ranker(query)", "served")
DEFAULT_STAGES = STAGES
STATIC_OF_STAGE = {
    "retrieval": "two-tower",
    "+ranker": "two-tower+ranker",
    "+ranker(query)": "two-tower+ranker",
    "served": "two-tower+ranker",
}


def served_lists(
    ranked: np.ndarray,
    candidates: np.ndarray,
    sessions: np.ndarray,
    has_session: np.ndarray,
    item_table: np.ndarray,
    share: float,
    length: int,
) -> np.ndarray:
    """The request path's list per user: ``ranked`` (the ranker's order) with a ``share`` of the first
    ``length`` places, spread from the top, given to the candidates nearest the session vector
    (``interleave``); a user without a session gets ``ranked`` as it is. -1 padded to ``length``."""
    out = np.full((len(ranked), length), -1, dtype=np.int64)
    for j in range(len(ranked)):
        mine = ranked[j][ranked[j] >= 0]
        if not has_session[j]:
            order = mine[:length].tolist()
        else:
            pool = candidates[j][candidates[j] >= 0]
            nearness = item_table[pool].astype(np.float64) @ sessions[j]
            order = interleave(mine.tolist(), pool[np.argsort(-nearness, kind="stable")].tolist(), share, length)
        out[j, : len(order)] = order
    return out


def evaluate_temporal(
    data: Dataset,
    split: Split,
    user_table: np.ndarray,
    item_table: np.ndarray,
    rank: RankFn,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    sessions: Sequence[SessionSpec] = DEFAULT_SESSIONS,
    ks: tuple[int, ...] = KS,
    n_candidates: int = SERVING_CANDIDATES,
    max_users: int | None = MAX_EVAL_USERS,
    seed: int = 0,
    chunk_users: int = CHUNK_USERS,
    default_kind: str = DEFAULT_EVENT_KIND,
    stages: Sequence[str] = DEFAULT_STAGES,
    list_length: int = SERVING_LIST_LENGTH,
) -> dict[str, dict[str, Any]]:
    """``{row: {"ndcg@10": mean, "ndcg@10_se": standard error, ...}}`` for ``popularity``, ``two-tower``
    (retrieval alone), ``two-tower+ranker`` and, per session spec and alpha, the session-aware query's
    retrieval, ``+ranker`` (the ranker sees the user's own vector, as it was trained), ``+ranker(query)``
    (it sees the blended query) and ``served`` (that, with a share alpha of the first ``list_length``
    places to the candidates nearest the session: the request path's answer), each in ``stages``. Session
    rows also carry ``<metric>_delta`` and ``<metric>_delta_se``: the paired per-user difference from the
    static row of the same stage, and ``session_share``: the share of users whose session had weight.
    ``"_meta"`` says who was evaluated and how.

    Evaluated: users with training interactions and test interactions with items new to them (a seeded
    sample of ``max_users`` past that many). Candidates exclude each user's training items, as the request
    path excludes seen ones, so a test interaction with an item the user had in training is not counted
    (MovieLens has none: one rating per user and movie). Every other test item counts as relevant,
    including items with no training interaction at all (``_meta.cold_test_share``), which no model here
    can rank well."""
    for spec in sessions:
        spec.validate()
    if not set(stages) <= set(STAGES):
        raise ValueError(f"stages must be among {list(STAGES)}, got {list(stages)}")
    if any(not 0.0 <= alpha <= 1.0 for alpha in alphas):
        raise ValueError(f"every alpha must be in [0, 1], got {list(alphas)}")
    train_seen = seen_by_user(data, split.train)
    # What the user did next that they had not done before: the request path never recommends a seen item.
    fresh = split.test & ~np.isin(
        data.user_idx * data.n_items + data.item_idx,
        data.user_idx[split.train] * data.n_items + data.item_idx[split.train],
    )
    test_items = seen_by_user(data, fresh)
    eligible = np.flatnonzero((test_items.counts() > 0) & (train_seen.counts() > 0))
    users = sample_users(eligible, max_users, seed)
    counts = np.bincount(data.item_idx[split.train], minlength=data.n_items)
    by_popularity = np.argsort(-counts, kind="stable")
    history = History.of(data, split)
    max_k = max(ks)
    n_candidates = min(max(n_candidates, max_k), data.n_items)
    if list_length < max_k:
        raise ValueError(f"list_length must be >= the largest k ({max_k}), got {list_length}")

    per_user: dict[str, dict[str, list[np.ndarray]]] = {}
    shares: dict[str, list[np.ndarray]] = {spec.name: [] for spec in sessions}

    def record(name: str, rows: np.ndarray, recs: np.ndarray) -> None:
        hits = hits_at(recs, test_items, rows)
        n_relevant = test_items.counts()[rows]
        slot = per_user.setdefault(name, {})
        for k in ks:
            recall, ndcg = user_recall_ndcg(hits, n_relevant, k)
            slot.setdefault(f"recall@{k}", []).append(recall)
            slot.setdefault(f"ndcg@{k}", []).append(ndcg)

    for start in range(0, len(users), chunk_users):
        rows = users[start : start + chunk_users]
        exclude = restrict(train_seen, rows)
        record("popularity", rows, popular_for(by_popularity, train_seen, rows, max_k))
        own = user_table[rows]
        static = retrieve(own, item_table, n_candidates, exclude)
        found: dict[tuple[str, float], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for spec in sessions:
            queries, has_session, vectors = session_queries(
                data, history, rows, user_table, item_table, spec, alphas, default_kind
            )
            shares[spec.name].append(has_session)
            for alpha, query in queries.items():
                found[spec.name, alpha] = (
                    query,
                    retrieve(query, item_table, n_candidates, exclude),
                    has_session,
                    vectors,
                )
        own_scores = PairScores.of(rank, rows, own, [static, *(f[1] for f in found.values())], data.n_items)
        record("two-tower", rows, static)
        record("two-tower+ranker", rows, own_scores.rerank(static))
        for (name, alpha), (query, lists, has_session, vectors) in found.items():
            if "retrieval" in stages:
                record(session_row(name, alpha, "retrieval"), rows, lists)
            if "+ranker" in stages:
                record(session_row(name, alpha, "+ranker"), rows, own_scores.rerank(lists))
            if "+ranker(query)" in stages or "served" in stages:
                # Without a session the query is the user's own vector: those users' scores are cached.
                by_query = own_scores.rerank(lists)
                moved = np.flatnonzero(has_session)
                if len(moved):
                    by_query[moved] = rerank(rank, rows[moved], query[moved], lists[moved])
                if "+ranker(query)" in stages:
                    record(session_row(name, alpha, "+ranker(query)"), rows, by_query)
                if "served" in stages:
                    served = served_lists(by_query, lists, vectors, has_session, item_table, alpha, list_length)
                    record(session_row(name, alpha, "served"), rows, served)
        log.info("evaluated %d of %d users", min(start + chunk_users, len(users)), len(users))

    results: dict[str, dict[str, Any]] = {}
    joined = {name: {m: np.concatenate(parts) for m, parts in metrics.items()} for name, metrics in per_user.items()}
    for name, metrics in joined.items():
        row: dict[str, Any] = {}
        for metric, values in metrics.items():
            row[metric] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_se"] = _standard_error(values)
        results[name] = row
    for spec in sessions:
        share = np.concatenate(shares[spec.name]) if shares[spec.name] else np.zeros(0, bool)
        for alpha in alphas:
            for stage in STAGES:
                name = session_row(spec.name, alpha, stage)
                if name not in joined:
                    continue
                base = joined[STATIC_OF_STAGE[stage]]
                for metric, values in joined[name].items():
                    delta = values - base[metric]
                    results[name][f"{metric}_delta"] = float(delta.mean()) if len(delta) else float("nan")
                    results[name][f"{metric}_delta_se"] = _standard_error(delta)
                results[name]["session_share"] = float(share.mean()) if len(share) else float("nan")
    test_rows = fresh & np.isin(data.user_idx, users)
    results["_meta"] = {
        "users_evaluated": len(users),
        "users_eligible": len(eligible),
        "users_total": data.n_users,
        "train_interactions": int(split.train.sum()),
        "test_interactions_evaluated": int(test_rows.sum()),
        "cold_test_share": float((counts[data.item_idx[test_rows]] == 0).mean()) if test_rows.any() else 0.0,
        "candidates": n_candidates,
        "served_list_length": list_length,
        "alphas": list(alphas),
        "sessions": [_spec_json(spec) for spec in sessions],
        "default_event_kind": default_kind if data.event_type is None else None,
        "sample_seed": seed,
    }
    return results


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def _spec_json(spec: SessionSpec) -> dict[str, Any]:
    out = asdict(spec)
    for key in ("window_s", "half_life_s"):
        out[key] = None if math.isinf(out[key]) else out[key]  # JSON has no infinity: null means none
    return out


# --------------------------------------------------------------------------------------------------
# End to end


def run(
    data: Dataset,
    split_kind: str,
    cfg: TrainConfig | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    sessions: Sequence[SessionSpec] = DEFAULT_SESSIONS,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_users: int | None = MAX_EVAL_USERS,
    stages: Sequence[str] = DEFAULT_STAGES,
) -> dict[str, dict[str, Any]]:
    """Split ``data`` by time, check the split leaks no future, train the two-tower and the ranker on
    the past (``export.train``, as the pipeline does), and evaluate every model on what followed."""
    cfg = cfg or TrainConfig()
    split, cutoff = make_split(data, split_kind, test_fraction)
    check_past_only(data, split)
    started = time.perf_counter()
    models = train(data, split, cfg)
    trained = time.perf_counter()
    report = evaluate_temporal(
        data,
        split,
        models.user_embeddings,
        models.item_embeddings,
        ranker_rank_fn(models),
        alphas=alphas,
        sessions=sessions,
        max_users=max_users,
        stages=stages,
    )
    report["_meta"].update(
        {
            "dataset": data.name,
            "split": split_kind,
            "test_fraction": test_fraction,
            "cutoff": None if cutoff is None else datetime.fromtimestamp(cutoff, UTC).isoformat(),
            "train_config": asdict(cfg),
            "train_seconds": round(trained - started, 1),
            "evaluate_seconds": round(time.perf_counter() - trained, 1),
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    return report


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """A markdown table: NDCG@10 and recall@50 (± standard error), and for session rows the paired
    difference in NDCG@10 from the static row of the same stage and the share of users with a session."""
    meta = report["_meta"]
    lines = [
        f"{meta.get('dataset', '?')}, split {meta.get('split', '?')}"
        + (f" (cutoff {meta['cutoff']})" if meta.get("cutoff") else "")
        + f": {meta['users_evaluated']} users, {meta['test_interactions_evaluated']} test interactions "
        f"({meta['cold_test_share']:.1%} on items unseen in training), {meta['candidates']} candidates",
        "",
        "| model | NDCG@10 | recall@50 | ΔNDCG@10 vs static | Δrecall@50 vs static | with a session |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in report.items():
        if name.startswith("_"):
            continue
        delta = "" if "ndcg@10_delta" not in row else f"{row['ndcg@10_delta']:+.4f} ± {row['ndcg@10_delta_se']:.4f}"
        rdelta = (
            "" if "recall@50_delta" not in row else f"{row['recall@50_delta']:+.4f} ± {row['recall@50_delta_se']:.4f}"
        )
        share = "" if "session_share" not in row else f"{row['session_share']:.0%}"
        lines.append(
            f"| {name} | {row['ndcg@10']:.4f} ± {row['ndcg@10_se']:.4f} | {row['recall@50']:.4f} ± "
            f"{row['recall@50_se']:.4f} | {delta} | {rdelta} | {share} |"
        )
    return "\n".join(lines)


def report_path(build_dir: Path, dataset: str, split_kind: str) -> Path:
    return build_dir / "eval" / f"temporal-{dataset}-{split_kind}.json"
