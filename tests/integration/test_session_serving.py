"""Session-aware serving and fallbacks that follow the user, over real HTTP on a real Redis and a real Triton
(docs/SESSION.md). The synthetic items have a genre, and the two towers place items of one genre close
together: clicks on a genre show up as more of that genre in the next answer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from statistics import median

import httpx
import pytest
import redis

from orchestrator import schema
from orchestrator.store import keys
from tests.conftest import API_HEADERS, Stack, running_orchestrator
from tests.integration.test_orchestrator_http import forget, recs

pytestmark = pytest.mark.integration

N = 20


def genres(stack: Stack) -> dict[str, int]:
    bundle = stack.exported.bundle
    return dict(zip(bundle.item_ids, bundle.item_features[:, 0].tolist(), strict=True))  # column 0: genre


def post_events(base: str, user: str, items: list[str], kind: str = "click") -> None:
    for item in items:
        response = httpx.post(
            f"{base}/v1/events",
            json={"user_id": user, "item_id": item, "type": kind},
            headers=API_HEADERS,
            timeout=10,
        )
        assert response.status_code == 202, response.text


def fresh_session(stack: Stack, user: str, base: str) -> None:
    """The user with no session events and no cached list (the load test and the fuzzer share this Redis)."""
    client = redis.Redis.from_url(stack.redis.url)
    client.delete(keys.session(user))
    client.close()
    forget(stack, user, base)


def item_ids(body: dict) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def of_genre(items: list[str], genre: int, genre_of: dict[str, int]) -> int:
    return sum(genre_of[i] == genre for i in items)


def narrow_user(stack: Stack) -> str:
    """A user whose history spans few genres (ids the other tests do not use): many genres left untouched."""
    genre_of, history = genres(stack), stack.exported.bundle.user_history
    users = [u for u in stack.exported.bundle.user_ids[100:200] if history.get(u)]
    return min(users, key=lambda u: len({genre_of[i] for i in history[u]}))


def untouched_genre(stack: Stack, user: str, shown: list[str]) -> int:
    """A genre with plenty of items that the user's history never touched, and the rarest of those in what
    they are shown now."""
    genre_of = genres(stack)
    history = {genre_of[i] for i in stack.exported.bundle.user_history[user]}
    sizes = Counter(genre_of.values())
    candidates = [g for g, size in sizes.items() if g not in history and size >= 10]
    assert candidates, f"user {user} touched every large genre ({sorted(history)}); pick another user"
    return min(candidates, key=lambda g: (of_genre(shown, g, genre_of), -sizes[g]))


def popular_of_genre(stack: Stack, genre: int, excluded: set[str], n: int) -> list[str]:
    genre_of = genres(stack)
    ranked = [i for i in stack.exported.bundle.popular["global"] if genre_of[i] == genre and i not in excluded]
    ranked += [i for i in stack.exported.bundle.item_ids if genre_of[i] == genre and i not in excluded | set(ranked)]
    return ranked[:n]


def test_clicks_on_a_kind_of_item_the_user_never_touched_bring_more_of_that_kind(app_url: str, stack: Stack) -> None:
    user = narrow_user(stack)
    fresh_session(stack, user, app_url)
    before = recs(app_url, user, n=N)
    assert before["source"] in {"realtime", "cache"}
    genre_of = genres(stack)
    genre = untouched_genre(stack, user, item_ids(before))
    clicked = popular_of_genre(stack, genre, set(item_ids(before)), 3)

    post_events(app_url, user, clicked)
    after = recs(app_url, user, n=N, debug="true")

    assert after["source"] == "realtime", after  # the clicks dropped the cached list
    assert "session" in after["timings_ms"], after["timings_ms"]
    shown_before, shown_after = of_genre(item_ids(before), genre, genre_of), of_genre(item_ids(after), genre, genre_of)
    print(f"user {user}, genre {genre}: {shown_before} -> {shown_after} of {N}")  # the figure in docs/SESSION.md
    assert shown_after > shown_before, (genre, shown_before, shown_after)
    similar = [i for i in item_ids(after) if genre_of[i] == genre and i not in clicked]
    assert similar, f"only the clicked items of genre {genre} came back: {item_ids(after)}"


def test_an_unknown_user_with_session_events_gets_items_like_those_they_touched(app_url: str, stack: Stack) -> None:
    user = "visitor-session-1"
    fresh_session(stack, user, app_url)
    genre_of = genres(stack)
    global_top = stack.exported.bundle.popular["global"][:N]
    genre = min(Counter(genre_of.values()), key=lambda g: of_genre(global_top, g, genre_of))  # far from popular
    touched = popular_of_genre(stack, genre, set(), 3)

    post_events(app_url, user, touched[:2], "click")
    post_events(app_url, user, touched[2:], "view")
    body = recs(app_url, user, n=10, debug="true")

    assert (body["source"], body["fallback_reason"]) == ("session", "unknown_user"), body
    assert "session_retrieval" in body["timings_ms"]
    shown = item_ids(body)
    assert len(shown) == 10 and not set(shown) & set(touched)  # similar items, not the touched ones again
    assert of_genre(shown, genre, genre_of) >= 5, [genre_of[i] for i in shown]
    assert of_genre(shown, genre, genre_of) > of_genre(global_top[:10], genre, genre_of)


def test_an_unknown_user_without_session_events_gets_the_global_list_and_says_so(app_url: str, stack: Stack) -> None:
    body = recs(app_url, "visitor-without-events", n=5, debug="true")
    assert (body["source"], body["fallback_reason"], body["segment"]) == ("popular", "unknown_user", "global")
    assert item_ids(body) == stack.exported.bundle.popular["global"][:5]


@pytest.fixture(scope="module")
def starved_url(stack: Stack, triton: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An orchestrator that never computes in real time: the whole real-time budget is its minimum, so every
    miss answers from the fallback at once (reason ``overload``), as a saturated process does."""
    env = stack.env(
        triton.grpc_url,  # type: ignore[attr-defined]
        RECSERVE_DEADLINE_MIN_COMPUTE_MS="800",  # = request_ms 1000 - fallback_reserve_ms 200
        RECSERVE_OVERLOAD_HOLD_S="0",
    )
    with running_orchestrator(env, tmp_path_factory.mktemp("starved") / "app.log") as app:
        yield app.url


def test_a_known_users_fallback_is_their_segments_popular_list(starved_url: str, stack: Stack) -> None:
    bundle = stack.exported.bundle
    segment_of = {
        u: schema.user_segment(int(row[0])) for u, row in zip(bundle.user_ids, bundle.user_features, strict=True)
    }
    global_top = bundle.popular["global"][:N]
    user = next(
        u
        for u in bundle.user_ids[200:]
        if segment_of[u] in bundle.popular and bundle.popular[segment_of[u]][:N] != global_top
    )
    segment = segment_of[user]
    client = redis.Redis.from_url(stack.redis.url)
    bought = {i.decode() if isinstance(i, bytes) else str(i) for i in client.smembers(keys.seen(user))}
    # Without its pre-computed list (put back after), the user's fallback is a popular list: theirs. The user's
    # cached answers go too: an earlier test on the same stack may have cached this very request.
    own = (keys.recs(user, bundle.model_version), keys.recs(user), keys.rec_cache(user))
    stored = [k for k in own if client.exists(k)]
    kept = [(k, client.dump(k), client.pttl(k)) for k in stored]
    try:
        client.delete(*stored)
        body = recs(starved_url, user, n=N, debug="true")
    finally:
        for key, value, ttl in kept:
            if value is not None:
                client.restore(key, max(ttl, 0), value, replace=True)
        client.close()
    assert (body["source"], body.get("fallback_reason"), body.get("segment")) == ("popular", "overload", segment), body
    assert item_ids(body) == [i for i in bundle.popular[segment] if i not in bought][:N]
    assert item_ids(body) != global_top


def test_a_known_users_fallback_with_its_precomputed_list_says_no_segment(starved_url: str, stack: Stack) -> None:
    # An earlier test on the same stack (the load test draws users by Zipf) may have cached this user's answer,
    # which the starved orchestrator would then serve from the cache: it goes first.
    client = redis.Redis.from_url(stack.redis.url)
    client.delete(keys.rec_cache("210"))
    client.close()
    body = recs(starved_url, "210", n=5, debug="true")
    assert (body["source"], body["fallback_reason"]) == ("precomputed", "overload")
    assert "segment" not in body


def test_an_event_drops_only_its_users_cached_lists(app_url: str, stack: Stack) -> None:
    acting, idle = "131", "132"
    for user in (acting, idle):
        fresh_session(stack, user, app_url)
        recs(app_url, user, n=N)
        assert recs(app_url, user, n=N)["source"] == "cache"
    post_events(app_url, acting, [stack.exported.bundle.item_ids[7]], "view")
    assert recs(app_url, idle, n=N)["source"] == "cache"  # no new event: still a hit
    assert recs(app_url, acting, n=N)["source"] == "realtime"  # a view moved their query: recomputed
    assert recs(app_url, acting, n=N)["source"] == "cache"


def test_purchases_alone_leave_the_query_unmoved(app_url: str, stack: Stack) -> None:
    """A purchase is excluded from answers and does not count in the session (orchestrator/session.py)."""
    user = "133"
    fresh_session(stack, user, app_url)
    before = item_ids(recs(app_url, user, n=N))
    bought = before[-1]
    post_events(app_url, user, [bought], "purchase")
    after = recs(app_url, user, n=N, debug="true")
    assert after["source"] == "realtime" and "session" not in after["timings_ms"]
    assert bought not in item_ids(after) and len(item_ids(after)) == N
    # The ranker's order, unmoved: a candidate that took the bought one's place may rank anywhere among them.
    kept = [i for i in item_ids(after) if i in before]
    assert kept == [i for i in before if i != bought][: len(kept)] and len(kept) >= N - 2


STAGES = ("cache", "user_features", "session", "retrieval", "item_features", "ranking", "total")


def test_what_a_session_adds_to_a_miss(app_url: str, stack: Stack) -> None:
    """The added latency per request, measured: the same users' misses without and then with three clicks in
    their session, interleaved so that both share the machine's load (docs/SESSION.md quotes the output)."""
    bundle, genre_of = stack.exported.bundle, genres(stack)
    without: dict[str, list[float]] = {stage: [] for stage in STAGES}
    with_session: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for user in bundle.user_ids[220:250]:
        fresh_session(stack, user, app_url)
        plain = recs(app_url, user, n=N, debug="true")
        genre = genre_of[bundle.user_history[user][0]]
        post_events(app_url, user, popular_of_genre(stack, genre, set(), 3))
        moved = recs(app_url, user, n=N, debug="true")
        assert plain["source"] == moved["source"] == "realtime", (plain["source"], moved["source"])
        for timings, body in ((without, plain), (with_session, moved)):
            for stage in STAGES:
                timings[stage].append(body["timings_ms"].get(stage, 0.0))
    medians = {stage: (median(without[stage]), median(with_session[stage])) for stage in STAGES}
    print("\nstage | without a session (ms) | with 3 clicks (ms)")  # the table in docs/SESSION.md
    for stage, (plain_ms, session_ms) in medians.items():
        print(f"{stage} | {plain_ms:.2f} | {session_ms:.2f}")
    assert medians["session"][0] == 0.0 < medians["session"][1] < 50.0  # one round trip, on a shared machine
