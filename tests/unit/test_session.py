"""The session-aware query (orchestrator/session.py): event weights, the session vector, the blend. The
offline evaluation and the request path share these functions, so their edge cases are pinned here."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.session import EVENT_WEIGHTS, blend_query, event_weights, interleave, session_vector

NOW_MS = 1_800_000_000_000


def found(vector: np.ndarray | None) -> np.ndarray:
    assert vector is not None
    return vector


def test_a_stronger_signal_counts_more_and_an_older_event_less() -> None:
    events = [("view", NOW_MS), ("click", NOW_MS), ("add_to_cart", NOW_MS), ("click", NOW_MS - 600_000)]
    weights = event_weights(events, NOW_MS, window_s=1800, half_life_s=600)
    np.testing.assert_allclose(weights, [1.0, 2.0, 3.0, 1.0])  # the last one is one half-life old
    assert EVENT_WEIGHTS["view"] < EVENT_WEIGHTS["click"] < EVENT_WEIGHTS["add_to_cart"]


def test_purchases_unknown_kinds_old_and_future_events_weigh_nothing() -> None:
    events = [
        ("purchase", NOW_MS),  # bought: excluded from answers, not "more of the same"
        ("wishlist", NOW_MS),  # a kind the session does not weigh
        ("click", NOW_MS - 1_801_000),  # past the window
        ("click", NOW_MS + 61_000),  # more than a minute in the future: a wrong clock, not an event
        ("click", NOW_MS + 30_000),  # a little ahead (another replica's clock): counts as now
    ]
    np.testing.assert_allclose(event_weights(events, NOW_MS, 1800, 600), [0, 0, 0, 0, 2.0])


def test_no_events_give_no_weights() -> None:
    assert event_weights([], NOW_MS, 1800, 600).shape == (0,)


@pytest.mark.parametrize(("window_s", "half_life_s"), [(0, 600), (1800, 0), (-1, 600)])
def test_a_window_or_half_life_that_is_not_positive_is_refused(window_s: float, half_life_s: float) -> None:
    with pytest.raises(ValueError, match=r"window_s and half_life_s must be > 0, got"):
        event_weights([("click", NOW_MS)], NOW_MS, window_s, half_life_s)


def test_the_session_vector_is_the_weighted_mean() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(found(session_vector(vectors, np.array([3.0, 1.0]))), [0.75, 0.25])


def test_a_weight_per_vector_or_a_message_with_both_counts() -> None:
    with pytest.raises(ValueError, match="expected one weight per item vector, but found 3 weights for 2 vectors"):
        session_vector(np.ones((2, 4), np.float32), np.ones(3))


def test_without_weight_or_items_there_is_no_session() -> None:
    assert session_vector(np.zeros((0, 2), np.float32), np.zeros(0)) is None
    assert session_vector(np.ones((2, 2), np.float32), np.zeros(2)) is None


def test_the_blend_scales_the_session_to_the_users_norm() -> None:
    user = np.array([2.0, 0.0], dtype=np.float32)
    session = np.array([0.0, 0.5])
    blended = blend_query(user, session, alpha=0.5)
    assert blended is not None and blended.dtype == np.float32
    np.testing.assert_allclose(blended, [1.0, 1.0])  # half of (2, 0) + half of (0, 2): the session at norm 2
    np.testing.assert_allclose(found(blend_query(user, session, alpha=0.0)), user)
    np.testing.assert_allclose(found(blend_query(user, session, alpha=1.0)), [0.0, 2.0])


def test_the_blend_without_a_session_a_user_or_either() -> None:
    user = np.array([1.0, 2.0], dtype=np.float64)
    unchanged = blend_query(user, None, 0.5)
    assert unchanged is not None and unchanged.dtype == np.float32
    np.testing.assert_allclose(unchanged, user)
    alone = blend_query(None, np.array([0.0, 3.0]), 0.5)  # a user the model has not seen: the session alone
    assert alone is not None
    np.testing.assert_allclose(alone, [0.0, 3.0])
    assert blend_query(None, None, 0.5) is None
    np.testing.assert_allclose(found(blend_query(user, np.zeros(2), 0.5)), user)  # a session with no direction
    np.testing.assert_allclose(found(blend_query(np.zeros(2), np.array([0.0, 3.0]), 0.5)), [0.0, 1.5])


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_alpha_outside_zero_to_one_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got"):
        blend_query(np.ones(2), np.ones(2), alpha)


def test_a_few_clicks_turn_the_query_toward_their_kind() -> None:
    """The property the request path relies on: the blended query prefers items near the clicked ones."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    items = np.concatenate([centres[0] + 0.5 * rng.normal(size=(50, 16)), centres[1] + 0.5 * rng.normal(size=(50, 16))])
    items /= np.linalg.norm(items, axis=1, keepdims=True)  # the towers' vectors are unit vectors
    user = centres[0] + rng.normal(size=16)  # a user of the first kind, as far as a user is one kind
    user /= np.linalg.norm(user)
    clicked = items[[50, 51, 52]]
    weights = event_weights([("click", NOW_MS)] * 3, NOW_MS, 1800, 600)
    query = blend_query(user, session_vector(clicked, weights), alpha=0.5)
    assert query is not None
    top = np.argsort(-(items @ query))[:20]
    assert (top >= 50).sum() > (np.argsort(-(items @ user))[:20] >= 50).sum()
    assert set(top.tolist()) - {50, 51, 52}  # similar items, not only the clicked ones


def test_interleave_spreads_the_sessions_share_of_places_evenly_from_the_top() -> None:
    ranked, nearest = ["r1", "r2", "r3", "r4", "r5", "r6"], ["s1", "s2", "s3"]
    assert interleave(ranked, nearest, 0.5, 6) == ["r1", "s1", "r2", "s2", "r3", "s3"]
    assert interleave(ranked, nearest, 0.3, 6) == ["r1", "r2", "r3", "s1", "r4", "r5"]
    assert interleave(ranked, nearest, 0.0, 4) == ranked[:4]
    assert interleave(ranked, nearest, 1.0, 4) == ["s1", "s2", "s3", "r1"]  # the session ran out: ranked fills


def test_interleave_places_an_item_once_and_stops_when_both_run_out() -> None:
    assert interleave(["a", "b", "c"], ["b", "a", "d"], 0.5, 10) == ["a", "b", "c", "d"]
    assert interleave([], [], 0.5, 3) == []


@pytest.mark.parametrize("share", [-0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\], got"):
        interleave(["a"], ["b"], share, 1)
