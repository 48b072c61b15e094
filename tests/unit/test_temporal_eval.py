"""Temporal evaluation on tiny hand-built data: the metrics by hand, the splits never train on the future,
and a session-aware query that must bring the item the session points at to the top."""

import math

import numpy as np
import pytest

from export.data import Dataset, Split, temporal_split
from export.evaluate import hits_at, recall_ndcg, user_recall_ndcg
from export.temporal_eval import (
    STAGES,
    History,
    SessionSpec,
    check_past_only,
    evaluate_temporal,
    global_cutoff,
    global_cutoff_split,
    make_split,
    served_lists,
    session_queries,
    session_row,
)
from export.topk import UserItems


def dataset(
    users: list[int],
    items: list[int],
    stamps: list[int],
    n_users: int,
    n_items: int,
    event_types: tuple[str, ...] = (),
    event_type: list[int] | None = None,
) -> Dataset:
    return Dataset(
        name="tiny",
        user_ids=[f"u{i}" for i in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        user_features=np.zeros((n_users, 3), dtype=np.int64),
        item_genre_year=np.zeros((n_items, 2), dtype=np.int64),
        user_idx=np.asarray(users, dtype=np.int64),
        item_idx=np.asarray(items, dtype=np.int64),
        rating=np.ones(len(users), dtype=np.float32),
        timestamp=np.asarray(stamps, dtype=np.int64),
        event_type=None if event_type is None else np.asarray(event_type, dtype=np.int64),
        event_types=event_types,
    )


def dot_rank(item_table: np.ndarray):
    """A stand-in ranker: the dot product of the vector it is given with each candidate's."""

    def rank(users: np.ndarray, vectors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        scores = np.einsum("nd,ncd->nc", vectors, item_table[np.maximum(candidates, 0)])
        return np.where(candidates >= 0, scores, -np.inf)

    return rank


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_by_hand() -> None:
    truth = UserItems.of(np.array([0, 0, 1]), np.array([1, 9, 4]), n_users=2)
    recommended = np.array([[5, 1, 7], [2, 3, 4]])
    hits = hits_at(recommended, truth, np.array([0, 1]))
    assert hits.tolist() == [[False, True, False], [False, False, True]]
    recall, ndcg = user_recall_ndcg(hits, truth.counts(), k=3)
    # user 0: one of two relevant found at rank 2; user 1: the one relevant at rank 3
    assert recall.tolist() == pytest.approx([0.5, 1.0])
    assert ndcg.tolist() == pytest.approx([(1 / math.log2(3)) / (1 + 1 / math.log2(3)), 1 / math.log2(4)])
    recall1, ndcg1 = user_recall_ndcg(hits, truth.counts(), k=1)
    assert recall1.tolist() == [0.0, 0.0] and ndcg1.tolist() == [0.0, 0.0]


def test_padding_never_hits_and_means_match_recall_ndcg() -> None:
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(40), 5)
    truth = UserItems.of(users, rng.integers(0, 30, len(users)), n_users=40)
    recommended = np.stack([rng.permutation(30)[:12] for _ in range(40)])
    recommended[::7, -3:] = -1
    hits = hits_at(recommended, truth, np.arange(40))
    assert not hits[recommended < 0].any()
    for k in (1, 5, 12):
        recall, ndcg = user_recall_ndcg(hits, truth.counts(), k)
        expected = recall_ndcg(list(recommended), [set(truth[u].tolist()) for u in range(40)], k)
        assert (recall.mean(), ndcg.mean()) == pytest.approx(expected)


def test_metric_shapes_are_checked() -> None:
    truth = UserItems.of(np.array([0]), np.array([1]), n_users=2)
    with pytest.raises(ValueError, match="recommended has 1 rows but users has 2 entries"):
        hits_at(np.array([[1, 2]]), truth, np.array([0, 1]))
    with pytest.raises(ValueError, match="at least one relevant item"):
        user_recall_ndcg(np.zeros((2, 2), bool), np.array([1, 0]), k=2)


# ------------------------------------------------------------------------------------------------ splits


def leaky_log() -> Dataset:
    # user 0 is active throughout; user 1 only early; user 2 is first seen after the cutoff
    return dataset(
        users=[0, 0, 0, 0, 0, 1, 1, 2, 2, 0],
        items=[0, 1, 2, 3, 4, 0, 5, 1, 2, 5],
        stamps=[10, 20, 30, 40, 90, 15, 25, 95, 96, 100],
        n_users=3,
        n_items=6,
    )


def test_global_split_trains_on_nothing_from_the_cutoff_on() -> None:
    data = leaky_log()
    cutoff = global_cutoff(data, test_fraction=0.4)
    assert cutoff == 90  # 10 stamps; the 4 latest (90, 95, 96, 100) are at or after it
    split = global_cutoff_split(data, cutoff)
    assert data.timestamp[split.train].max() < cutoff <= data.timestamp[split.test].min()
    # user 2 has no past: a cold start, neither trained on nor tested
    assert not (split.train | split.test)[data.user_idx == 2].any()
    assert sorted(data.item_idx[split.test].tolist()) == [4, 5]
    check_past_only(data, split)


def test_per_user_split_keeps_each_users_future_out_of_training() -> None:
    data = leaky_log()
    split, cutoff = make_split(data, "per-user", 0.4)
    assert cutoff is None
    check_past_only(data, split)
    for user in range(data.n_users):
        train = data.timestamp[split.train & (data.user_idx == user)]
        test = data.timestamp[split.test & (data.user_idx == user)]
        if len(test):
            assert train.max() <= test.min()


def test_a_split_that_trains_on_the_future_is_refused() -> None:
    data = leaky_log()
    test = data.timestamp == 20  # user 0's 2nd interaction held out, their later ones trained on
    with pytest.raises(ValueError, match=r"1 users train on later ones \(user 'u0': train at 100, test from 20\)"):
        check_past_only(data, Split(train=~test, test=test))
    with pytest.raises(ValueError, match="expected disjoint train and test, but 10 rows are both"):
        check_past_only(data, Split(train=np.ones(10, bool), test=np.ones(10, bool)))


def test_split_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        make_split(leaky_log(), "random")
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.0"):
        global_cutoff(leaky_log(), 1.0)
    same_time = dataset([0, 1], [0, 1], [5, 5], n_users=2, n_items=2)
    with pytest.raises(ValueError, match="every timestamp is at or after it"):
        global_cutoff(same_time)


# ------------------------------------------------------------------------------------------------ sessions

# Two directions of taste. The user has always watched "x" items (0, 1); just before the test period
# they clicked two "y" items (2, 3). Item 4 is an unseen "y" item, item 5 an unseen "x" item, item 6 noise.
ITEMS = np.array(
    [[1.0, 0.0], [0.98, 0.2], [0.0, 1.0], [0.2, 0.98], [0.1, 0.995], [0.95, 0.3], [-1.0, 0.0]], dtype=np.float32
)
USERS = np.array([[1.0, 0.0]], dtype=np.float32)
NOW = 10_000  # the first test interaction: item 4


def session_log(click_ages_s: tuple[int, int] = (300, 60)) -> tuple[Dataset, Split]:
    stamps = [100, 200, NOW - click_ages_s[0], NOW - click_ages_s[1], NOW]
    data = dataset([0] * 5, [0, 1, 2, 3, 4], stamps, n_users=1, n_items=7)
    test = np.arange(5) == 4  # by row: a click at the very moment of the request stays in training
    return data, Split(train=~test, test=test)


def test_a_session_brings_the_item_it_points_at_to_the_top() -> None:
    data, split = session_log()
    report = evaluate_temporal(
        data,
        split,
        USERS,
        ITEMS,
        dot_rank(ITEMS),
        alphas=(0.0, 0.75),
        sessions=(SessionSpec("serving"),),
        ks=(1, 3),
        stages=STAGES,
    )
    # Static: the user's vector points at "x", so item 5 comes first and item 4 (the truth) is last but noise.
    assert report["two-tower"]["ndcg@1"] == 0.0
    assert report["two-tower+ranker"]["ndcg@1"] == 0.0
    # Blended with the "y" clicks, item 4 comes first, in retrieval and after a ranker given the query.
    assert report[session_row("serving", 0.75, "retrieval")]["ndcg@1"] == 1.0
    assert report[session_row("serving", 0.75, "+ranker(query)")]["ndcg@1"] == 1.0
    assert report[session_row("serving", 0.75, "served")]["ndcg@1"] == 1.0
    assert report[session_row("serving", 0.75, "retrieval")]["ndcg@1_delta"] == 1.0
    assert report[session_row("serving", 0.75, "retrieval")]["session_share"] == 1.0
    # A ranker given the user's own vector puts the "x" item back on top: what the ranker sees matters.
    assert report[session_row("serving", 0.75, "+ranker")]["ndcg@1"] == 0.0
    # alpha 0 is the static model, row for row.
    for stage, static in (("retrieval", "two-tower"), ("+ranker", "two-tower+ranker")):
        row = report[session_row("serving", 0.0, stage)]
        assert {m: row[m] for m in ("ndcg@1", "recall@3")} == {m: report[static][m] for m in ("ndcg@1", "recall@3")}
    assert report["_meta"]["users_evaluated"] == 1 and report["_meta"]["candidates"] == 7


def test_a_session_older_than_the_window_changes_nothing() -> None:
    data, split = session_log(click_ages_s=(4000, 3000))  # both clicks before the 30-minute window
    report = evaluate_temporal(
        data,
        split,
        USERS,
        ITEMS,
        dot_rank(ITEMS),
        alphas=(0.75,),
        sessions=(
            SessionSpec("serving", window_s=1800),
            SessionSpec("last-k", 2, window_s=math.inf, half_life_s=math.inf),
        ),
        ks=(1,),
    )
    serving = report[session_row("serving", 0.75, "retrieval")]
    assert serving["session_share"] == 0.0 and serving["ndcg@1"] == report["two-tower"]["ndcg@1"] == 0.0
    # Without the window, the last K (here 2: the clicks) items do make the session: the control the report carries.
    assert report[session_row("last-k", 0.75, "retrieval")]["ndcg@1"] == 1.0


def test_the_session_is_the_latest_k_training_events_weighted_by_recency() -> None:
    data, split = session_log(click_ages_s=(600, 0))
    history = History.of(data, split)
    assert history.latest(0, 2).tolist() == [2, 3] and int(history.now_s[0]) == NOW
    spec = SessionSpec("serving", max_events=2, window_s=1800, half_life_s=600)
    queries, has_session, vectors = session_queries(data, history, np.array([0]), USERS, ITEMS, spec, alphas=(1.0,))
    assert has_session.tolist() == [True]
    # weights 1 (just now) and 1/2 (one half-life ago), then scaled to the user's norm (1)
    expected = (ITEMS[3] + 0.5 * ITEMS[2]) / 1.5
    assert queries[1.0][0] == pytest.approx(expected / np.linalg.norm(expected), abs=1e-6)
    assert vectors[0] == pytest.approx(expected)


def test_the_served_list_gives_the_session_its_share_of_places() -> None:
    ranked = np.array([[5, 6, 4], [5, 6, 4]])
    candidates = np.array([[4, 5, 6], [4, 5, 6]])
    sessions = np.array([[0.0, 1.0], [0.0, 0.0]])  # user 1 has no session
    served = served_lists(ranked, candidates, sessions, np.array([True, False]), ITEMS, share=0.5, length=4)
    # places 1 and 3 (1-based 2 and 4) are the session's: item 4 is the nearest "y" item; item 6 is already placed
    assert served.tolist() == [[5, 4, 6, -1], [5, 6, 4, -1]]


def test_event_types_of_the_log_are_the_session_kinds() -> None:
    base, split = session_log()
    # the two "y" interactions are purchases: a kind the session does not weigh, so no session is left
    data = dataset(
        base.user_idx.tolist(),
        base.item_idx.tolist(),
        base.timestamp.tolist(),
        n_users=1,
        n_items=7,
        event_types=("view", "purchase"),
        event_type=[0, 0, 1, 1, 0],
    )
    _, has_session, _ = session_queries(
        data, History.of(data, split), np.array([0]), USERS, ITEMS, SessionSpec("serving"), alphas=(0.5,)
    )
    assert has_session.tolist() == [False]


def test_chunking_does_not_change_the_result() -> None:
    rng = np.random.default_rng(11)
    n_users, n_items, dim = 30, 40, 4
    users = np.repeat(np.arange(n_users), 12)
    stamps = rng.integers(0, 10_000, len(users))
    items = np.concatenate([rng.permutation(n_items)[:12] for _ in range(n_users)])  # no item twice per user
    data = dataset(users.tolist(), items.tolist(), stamps.tolist(), n_users, n_items)
    split = temporal_split(data, 0.25)
    user_table = rng.normal(size=(n_users, dim)).astype(np.float32)
    item_table = rng.normal(size=(n_items, dim)).astype(np.float32)

    def run(chunk_users: int) -> dict:
        return evaluate_temporal(
            data,
            split,
            user_table,
            item_table,
            dot_rank(item_table),
            alphas=(0.5,),
            sessions=(SessionSpec("serving", window_s=5000),),
            n_candidates=20,
            chunk_users=chunk_users,
            stages=STAGES,
        )

    whole, chunked = run(1000), run(7)
    assert whole == chunked
    assert whole["_meta"]["users_evaluated"] == n_users


def test_an_item_seen_in_training_is_not_a_test_item() -> None:
    # the user comes back to item 0 (seen in training, never recommended again) and then to item 4
    again = dataset([0] * 6, [0, 1, 2, 3, 0, 4], [100, 200, 9700, 9940, NOW, NOW + 1], n_users=1, n_items=7)
    test = np.arange(6) >= 4
    report = evaluate_temporal(
        again, Split(~test, test), USERS, ITEMS, dot_rank(ITEMS), alphas=(0.75,), sessions=(SessionSpec("s"),), ks=(1,)
    )
    assert report["_meta"]["test_interactions_evaluated"] == 1
    assert (
        report[session_row("s", 0.75, "retrieval")]["ndcg@1"]
        == report[session_row("s", 0.75, "retrieval")]["recall@1"]
        == 1.0
    )


def test_evaluation_arguments_are_checked() -> None:
    data, split = session_log()
    with pytest.raises(ValueError, match=r"every alpha must be in \[0, 1\], got \[1.5\]"):
        evaluate_temporal(data, split, USERS, ITEMS, dot_rank(ITEMS), alphas=(1.5,))
    with pytest.raises(ValueError, match="max_events must be an integer >= 1, got 0"):
        evaluate_temporal(data, split, USERS, ITEMS, dot_rank(ITEMS), sessions=(SessionSpec("s", max_events=0),))
