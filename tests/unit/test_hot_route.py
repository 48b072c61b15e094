"""The hot route answers exactly what the FastAPI route would, byte for byte, and hands everything else on."""

from __future__ import annotations

import random
from types import SimpleNamespace

import httpx
import pytest

from orchestrator.app import HOT_ROUTE_RULES, create_app
from orchestrator.config import Settings
from orchestrator.recommender import Recommendation, RequestContext


class EchoRecommender:
    """Answers with what it was asked, so that any difference in parsing shows in the body."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, RequestContext]] = []

    async def recommend(self, user_id: str, n: int, context: RequestContext) -> Recommendation:
        self.calls.append((user_id, n, context))
        items = [(f"{context.page_type}-{context.device}-{i}", 1.0 / (i + 1)) for i in range(n)]
        return Recommendation(user_id, items, "cache", "v7", {"cache": 0.1})


def client_for(hot_route: bool) -> tuple[httpx.AsyncClient, EchoRecommender]:
    app = create_app(Settings(hot_route_enabled=hot_route))
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
    ("path", "query", "expected"),
    [
        ("/v1/recommendations/7", b"", ("7", 20, "home", "web")),
        ("/v1/recommendations/u:1", b"n=5&page_type=cart&device=ios", ("u:1", 5, "cart", "ios")),
        ("/v1/recommendations/7", b"utm_source=mail&n=100", ("7", 100, "home", "web")),
    ],
)
def test_canonical_requests_are_taken(path: str, query: bytes, expected: tuple[str, int, str, str]) -> None:
    hot = HOT_ROUTE_RULES.parse("GET", path, query)
    assert hot is not None
    assert (hot.user_id, hot.n, hot.context.page_type, hot.context.device) == expected


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("POST", "/v1/recommendations/7", b""),
        ("GET", "/v1/recommendations/7/", b""),
        ("GET", "/v1/recommendations/", b""),
        ("GET", "/v1/recommendations/7", b"debug=true"),
        ("GET", "/v1/recommendations/7", b"n=05"),
        ("GET", "/v1/recommendations/7", b"n=5&n=6"),
        ("GET", "/v1/recommendations/7", b"page_type=%68ome"),
        ("GET", "/v1/recommendations/7", b"page%5Ftype=cart"),
        ("GET", "/v1/segments/all/recommendations", b""),
    ],
)
def test_everything_else_is_left_to_fastapi(method: str, path: str, query: bytes) -> None:
    assert HOT_ROUTE_RULES.parse(method, path, query) is None
