"""In process (no services): /readyz says 503 while admission refuses every request for a sustained window
and ready again once a request is admitted; a request takes its admission slot only once its body is
complete; /metrics is rendered at most once per interval. Clocks are injected and concurrency is gated
with events: nothing here sleeps."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
from pydantic import SecretStr

from orchestrator.api.health import RenderedMetrics
from orchestrator.app import create_app
from orchestrator.config import EventsSettings, LimitsSettings, Settings
from orchestrator.ratelimit import Limit, Limiters, LocalLimiter, NoLimit
from orchestrator.recommender import Recommendation, RequestContext

KEY = "key-of-the-edge-tests-0123"


class GatedRecommender:
    """Holds every request until ``gate`` is set: the slots it holds stay taken meanwhile."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def recommend(self, user_id: str, n: int, context: RequestContext) -> Recommendation:
        self.entered.set()
        await self.gate.wait()
        return Recommendation(user_id, [("1", 1.0)], "cache", "v1", {})


async def ready_parts() -> dict[str, Any]:
    return {"popular": SimpleNamespace(state="ok", ok=True)}


class Recorder:
    def __init__(self) -> None:
        self.taken: list[tuple[str, str, str]] = []

    async def record(
        self, user_id: str, item_id: str, event_type: str, event_id: str | None = None, request_id: str | None = None
    ) -> str:
        self.taken.append((user_id, item_id, event_type))
        return f"{len(self.taken)}-0"


def gated_app(window_s: float = 2.0) -> tuple[Any, GatedRecommender, list[float]]:
    settings = Settings(
        limits=LimitsSettings(max_in_flight=1, shedding_window_s=window_s),
        events=EventsSettings(api_keys=SecretStr(f"edge:{KEY}")),
    )
    app = create_app(settings)
    recommender = GatedRecommender()
    limit = Limit(rate_per_s=1, burst=100)
    app.state.services = SimpleNamespace(
        settings=settings,
        recommender=recommender,
        readiness=ready_parts,
        ranker=SimpleNamespace(model_version="v1"),
        limiters=Limiters(LocalLimiter(limit), NoLimit(), limit, limit),
        events=Recorder(),
        catalogue=frozenset({"1"}),
    )
    now = [100.0]
    app.state.admission.clock = lambda: now[0]
    app.state.admission.last_admitted = now[0]
    return app, recommender, now


async def test_readyz_is_503_while_every_request_is_refused_and_ready_again_after() -> None:
    app, recommender, now = gated_app(window_s=2.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        held = asyncio.create_task(client.get("/v1/recommendations/1"))
        await recommender.entered.wait()  # the only slot is taken
        assert (await client.get("/v1/recommendations/2")).status_code == 503
        assert (await client.get("/readyz")).status_code == 200  # shedding, but not for the window yet
        now[0] += 2.5
        assert (await client.get("/v1/recommendations/3")).status_code == 503
        shedding = await client.get("/readyz")
        assert shedding.status_code == 503
        assert shedding.json() == {
            "status": "shedding",
            "detail": "every request refused for 2 s (1 in flight, limit 1)",
        }
        recommender.gate.set()
        assert (await held).status_code == 200
        assert (await client.get("/v1/recommendations/4")).status_code == 200  # admitted: ready again
        assert (await client.get("/readyz")).json()["status"] == "ready"


async def test_a_slot_held_past_the_window_is_not_ready_even_without_refusals() -> None:
    app, recommender, now = gated_app(window_s=2.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        held = asyncio.create_task(client.get("/v1/recommendations/1"))
        await recommender.entered.wait()
        now[0] += 3.0
        assert (await client.get("/readyz")).status_code == 503
        recommender.gate.set()
        await held


async def test_a_request_takes_its_slot_only_once_its_body_is_complete() -> None:
    """A body still arriving holds no admission slot: a request meanwhile is admitted (max_in_flight 1)."""
    app, recommender, _ = gated_app()
    recommender.gate.set()
    admission = app.state.admission
    body_started, rest = asyncio.Event(), asyncio.Event()
    messages = [b'{"user_id": "5", ', b'"item_id": "1", "type": "view"}']

    async def receive() -> dict[str, Any]:
        if not body_started.is_set():
            body_started.set()
            return {"type": "http.request", "body": messages[0], "more_body": True}
        await rest.wait()
        return {"type": "http.request", "body": messages[1], "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    body = b"".join(messages)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"x-api-key", KEY.encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/events", "raw_path": b"/v1/events", "query_string": b""}
    scope |= {"headers": headers, "client": ("127.0.0.1", 1), "server": ("t", 80), "scheme": "http"}
    scope |= {"http_version": "1.1", "root_path": "", "app": app}
    posting = asyncio.create_task(app(scope, receive, send))
    await body_started.wait()
    assert admission.in_flight == 0  # its body is not complete: no slot taken
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/v1/recommendations/1")).status_code == 200
    rest.set()
    await posting
    assert sent[0]["status"] == 202
    assert app.state.services.events.taken == [("5", "1", "view")]


def test_metrics_are_rendered_at_most_once_per_interval() -> None:
    now = [0.0]
    rendered = RenderedMetrics(interval_s=1.0, render=lambda: f"render at {now[0]}".encode(), clock=lambda: now[0])
    bodies = {rendered.get() for _ in range(1000)}
    assert bodies == {b"render at 0.0"} and rendered.renders == 1
    now[0] = 0.99
    assert rendered.get() == b"render at 0.0" and rendered.renders == 1
    now[0] = 1.0
    assert rendered.get() == b"render at 1.0" and rendered.renders == 2
