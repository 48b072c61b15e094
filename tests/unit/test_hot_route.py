"""The hot route answers exactly what the FastAPI route would, byte for byte, and hands everything else on."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import httpx
import pytest
from pydantic import SecretStr

from orchestrator.api import recommendations
from orchestrator.app import create_app
from orchestrator.config import Ablations, EventsSettings, Settings
from orchestrator.guards import Message, Receive, Scope, Send
from orchestrator.hot_route import HotRoute
from orchestrator.ratelimit import Limit, Limiters, LocalLimiter, NoLimit
from orchestrator.recommender import Recommendation, RequestContext
from orchestrator.store.errors import StoreUnavailable


class EchoRecommender:
    """Answers with what it was asked, so that any difference in parsing shows in the body."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, RequestContext]] = []

    async def recommend(self, user_id: str, n: int, context: RequestContext) -> Recommendation:
        self.calls.append((user_id, n, context))
        items = [(f"{context.page_type}-{context.device}-{i}", 1.0 / (i + 1)) for i in range(n)]
        return Recommendation(user_id, items, "cache", "v7", {"cache": 0.1})


def client_for(hot_route: bool) -> tuple[httpx.AsyncClient, EchoRecommender]:
    app = create_app(Settings(), Ablations(hot_route_enabled=hot_route))
    recommender = EchoRecommender()
    app.state.services = SimpleNamespace(recommender=recommender)  # no lifespan: only the recommender is used
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), recommender


VALID_IDS = ["7", "u:1", "a.b@c-d_e", "x" * 64]
ODD_IDS = ["x" * 65, "a%20b", "%7Bu%3A1%7D", "7/", "%37", "é", ""]
VALID = {"n": ["1", "20", "100"], "page_type": ["home", "cart"], "device": ["web", "ios"]}
ODD_VALUES = ["101", "0", "01", "+5", "-1", "1e1", "5.0", " 5", "HOME", "%68ome", "fridge", "", "true", "%20"]
EXTRA_KEYS = ["debug", "utm_source", "N", "n%3D", "", "page%5Ftype"]


def random_url(rng: random.Random) -> str:
    """Mostly valid requests with a perturbation or two, so that both sides of every rule get exercised."""
    user = rng.choice(VALID_IDS) if rng.random() < 0.7 else rng.choice(ODD_IDS)
    parts = []
    for key, values in VALID.items():
        if rng.random() < 0.6:
            parts.append(f"{key}={rng.choice(values) if rng.random() < 0.75 else rng.choice(ODD_VALUES)}")
    if rng.random() < 0.2:
        parts.append(f"{rng.choice(EXTRA_KEYS)}={rng.choice(ODD_VALUES + VALID['n'])}")
    if parts and rng.random() < 0.05:
        parts.append(rng.choice(parts))  # a repeated parameter
    if rng.random() < 0.05:
        parts.append(rng.choice(["&", "n", "=5"]))
    rng.shuffle(parts)
    query = "&".join(parts)
    return f"/v1/recommendations/{user}" + (f"?{query}" if query or rng.random() < 0.2 else "")


def comparable(response: httpx.Response) -> object:
    """The body's bytes; with debug timings (wall-clock figures that differ per call), the rest of it."""
    if b'"timings_ms"' not in response.content:
        return response.content
    body = response.json()
    body.pop("timings_ms")
    return body


async def test_both_routes_give_the_same_status_and_body_for_any_request() -> None:
    hot, hot_recommender = client_for(True)
    plain, _ = client_for(False)
    rng = random.Random(5)
    answered_hot = 0
    async with hot, plain:
        for _ in range(1000):
            url = random_url(rng)
            before = len(hot_recommender.calls)
            got, expected = await hot.get(url), await plain.get(url)
            assert (got.status_code, comparable(got)) == (expected.status_code, comparable(expected)), url
            assert got.headers.get("content-type") == expected.headers.get("content-type"), url
            answered_hot += got.status_code == 200 and len(hot_recommender.calls) > before
    assert answered_hot > 200  # the comparison covered many answered requests, not only 422s


@pytest.mark.parametrize(
    ("user_id", "query", "expected"),
    [
        ("7", b"", ("7", 20, "home", "web", False)),
        ("u:1", b"n=5&page_type=cart&device=ios", ("u:1", 5, "cart", "ios", False)),
        ("7", b"utm_source=mail&n=100", ("7", 100, "home", "web", False)),
        # Spellings FastAPI's own parameters accept too: both routes take them, through the one parser.
        ("7", b"debug=true", ("7", 20, "home", "web", True)),
        ("7", b"n=05", ("7", 5, "home", "web", False)),
        ("7", b"n=5&n=6", ("7", 6, "home", "web", False)),
        ("7", b"page_type=%68ome", ("7", 20, "home", "web", False)),
        ("7", b"page%5Ftype=cart", ("7", 20, "cart", "web", False)),
    ],
)
def test_valid_requests_are_parsed_into_their_query(
    user_id: str, query: bytes, expected: tuple[str, int, str, str, bool]
) -> None:
    parsed = recommendations.parse(user_id, query)
    assert isinstance(parsed, recommendations.RecommendationQuery)
    assert (parsed.user_id, parsed.n, parsed.context.page_type, parsed.context.device, parsed.debug) == expected


async def hot_route_answers(method: str, path: str, query: bytes = b"") -> bool:
    """Whether the hot route answers this request itself (else it hands it to FastAPI, the app within)."""
    handed_on: list[str] = []

    async def fastapi(scope: Scope, receive: Receive, send: Send) -> None:
        handed_on.append(scope["path"])

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    app = SimpleNamespace(state=SimpleNamespace(services=SimpleNamespace(recommender=EchoRecommender())))
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": [], "app": app}
    await HotRoute(fastapi, max_body_bytes=4096)(scope, receive, send)
    return not handed_on


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("POST", "/v1/recommendations/7", b""),
        ("GET", "/v1/recommendations/7/", b""),
        ("GET", "/v1/recommendations/7/x", b""),
        ("GET", "/v1/recommendations/", b""),
        ("GET", "/v1/recommendations/a b", b""),
        ("GET", "/v1/recommendations/7", b"n=0"),
        ("GET", "/v1/recommendations/7", b"n=5&n=101"),
        ("GET", "/v1/recommendations/7", b"page_type=fridge"),
        ("GET", "/v1/recommendations/7", b"debug=maybe"),
        ("GET", "/v1/segments/all/recommendations", b""),
        ("GET", "/v1/events", b""),
    ],
)
async def test_what_fastapi_routes_elsewhere_or_the_parser_refuses_is_left_to_fastapi(
    method: str, path: str, query: bytes
) -> None:
    assert not await hot_route_answers(method, path, query)


async def test_a_valid_request_is_answered_by_the_hot_route() -> None:
    assert await hot_route_answers("GET", "/v1/recommendations/u:1", b"n=5&page_type=cart&device=ios")


class CountingRecorder:
    """Stores nothing: numbers the events it takes, and fails those whose item is "down"."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, str, str]] = []

    async def record(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        event_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        if item_id == "down":
            raise StoreUnavailable("append to the events stream", ("shard-0",))
        self.taken.append((user_id, item_id, event_type))
        return f"{len(self.taken)}-0"


KEY, GREEDY_KEY = "key-of-tests-0123456789", "key-of-greedy-0123456789"


def events_client_for(hot_route: bool, anonymous_writes: bool) -> tuple[httpx.AsyncClient, CountingRecorder]:
    settings = Settings(
        events=EventsSettings(
            api_keys=SecretStr(f"tests:{KEY},greedy:{GREEDY_KEY}"),
            anonymous_writes=anonymous_writes,
            rate_per_s=1,
            burst=400,
        )
    )
    app = create_app(settings, Ablations(hot_route_enabled=hot_route))
    recorder = CountingRecorder()
    # A burst the test does not exhaust except for one caller ("greedy"), whose 429 must match too.
    write_limit = Limit(rate_per_s=1, burst=400)
    writes = LocalLimiter(write_limit, clock=lambda: 0.0)
    for _ in range(400):
        writes.buckets.acquire("greedy")
    limiters = Limiters(writes, NoLimit(), write_limit, Limit(rate_per_s=1, burst=1))
    app.state.services = SimpleNamespace(
        settings=settings, limiters=limiters, events=recorder, catalogue=frozenset({"12", "i:9", "down"})
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), recorder


def random_event(rng: random.Random, anonymous_writes: bool) -> tuple[bytes, list[tuple[str, str]]]:
    """Mostly valid events with a perturbation or two, so that both sides of every check get exercised."""
    event: dict[str, object] = {
        "user_id": rng.choice(VALID_IDS) if rng.random() < 0.8 else rng.choice([*ODD_IDS, 7, None]),
        "item_id": rng.choice(["12", "i:9", "down"]) if rng.random() < 0.85 else rng.choice(["", "a b", 3.5, "404"]),
        "type": rng.choice(["view", "click", "add_to_cart", "purchase"]) if rng.random() < 0.85 else "like",
    }
    if rng.random() < 0.1:
        event.pop(rng.choice(list(event)))
    if rng.random() < 0.05:
        event["extra"] = 1
    body = json.dumps(event).encode()
    if rng.random() < 0.05:
        body = body.replace(b'"type"', b'"type": "view", "type"', 1)  # a repeated key
    if rng.random() < 0.05:
        body = rng.choice([b"", b"{", b"[]", b"null", body + b"x", b" " + body + b"\n", b'{"user_id": NaN}'])
    content_type = "application/json"
    if rng.random() < 0.08:
        content_type = rng.choice(["text/plain", "application/json; charset=utf-8", "APPLICATION/JSON"])
    headers = [("content-type", content_type)]
    if rng.random() < 0.03:  # a second one, before or after: which one counts is the framework's call
        headers.insert(rng.randrange(2), ("content-type", rng.choice(["text/plain", "application/json"])))
    if rng.random() < 0.3:
        headers.append(("x-api-key", rng.choice(["wrong", "", GREEDY_KEY])))
    elif not anonymous_writes or rng.random() < 0.5:
        headers.append(("x-api-key", KEY))
    if rng.random() < 0.03:
        headers.append(("x-api-key", rng.choice([KEY, "wrong"])))
    return body, headers


@pytest.mark.parametrize("anonymous_writes", [False, True])
async def test_both_routes_take_the_same_events_and_refuse_the_rest_alike(anonymous_writes: bool) -> None:
    hot, hot_recorder = events_client_for(True, anonymous_writes)
    plain, plain_recorder = events_client_for(False, anonymous_writes)
    rng = random.Random(11)
    async with hot, plain:
        statuses = set()
        for _ in range(600):
            body, headers = random_event(rng, anonymous_writes)
            got = await hot.post("/v1/events", content=body, headers=headers)
            expected = await plain.post("/v1/events", content=body, headers=headers)
            assert (got.status_code, got.content) == (expected.status_code, expected.content), (body, headers)
            for name in ("content-type", "retry-after"):
                assert got.headers.get(name) == expected.headers.get(name), (body, headers, name)
            statuses.add(got.status_code)
    assert hot_recorder.taken == plain_recorder.taken and len(hot_recorder.taken) > 100
    # Every kind of answer was compared, not only the common ones.
    assert statuses >= {202, 401, 422, 429, 503}
