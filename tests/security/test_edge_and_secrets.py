"""Security over real HTTP and a real Redis with an ACL user: the orchestrator authenticates to Redis
with a user and password from the environment, writes need a named API key, a caller past its burst gets
429 + Retry-After (another key's burst untouched), big bodies 413, over-long fields 422; and no secret
reaches a log or a repr."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from orchestrator.config import EventsSettings, RedisSettings, Settings
from orchestrator.store import keys
from orchestrator.store.backend import Command, ConnectionOptions
from orchestrator.store.errors import StoreUnavailable
from orchestrator.store.sharded import ShardedBackend
from stack.redis_local import RedisServer, start_server
from tests.conftest import Stack, running_orchestrator
from tests.faults.conftest import load_stack
from tests.redis_harness import require_redis

pytestmark = pytest.mark.integration
REDIS_USER, REDIS_PASSWORD = "recserve", "redis-pw-5f1e9a7c0b"
API_KEY = "api-key-93b2c4d18e"
BURST_KEY = "burst-key-5e0f1a2b3c"  # its own caller: spending its burst leaves API_KEY's untouched
# In redis-server's config file (0600), never on its command line (tests/security/test_http_edge.py).
ACL = ("user default off", f"user {REDIS_USER} on >{REDIS_PASSWORD} ~* &* +@all -@admin")


@pytest.fixture(scope="module")
def acl_redis(stack: Stack) -> Iterator[RedisServer]:
    """A loaded redis-server whose default user is off: only the ACL user with its password gets in."""
    require_redis()
    server = start_server(config=ACL)
    try:
        load_stack(f"redis://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0", stack)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def secured_app(
    acl_redis: RedisServer, stack: Stack, triton: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("secured") / "app.log"
    env = stack.env(
        triton.grpc_url,
        RECSERVE_REDIS_URLS=acl_redis.url,  # no credentials in the URL: they come from their own variables
        RECSERVE_REDIS_USERNAME=REDIS_USER,
        RECSERVE_REDIS_PASSWORD=REDIS_PASSWORD,
        RECSERVE_EVENTS_API_KEYS=f"edge:{API_KEY},burst:{BURST_KEY}",
        RECSERVE_EVENTS_RATE_PER_S="0.5",
        RECSERVE_EVENTS_BURST="3",
        RECSERVE_LIMITS_MAX_BODY_BYTES="512",
    )
    with running_orchestrator(env, log) as app:
        app.log_path = log
        yield app


def event(user: str = "5") -> dict[str, str]:
    return {"user_id": user, "item_id": "7", "type": "view"}


async def test_redis_refuses_a_client_without_the_acl_password(acl_redis: RedisServer) -> None:
    anonymous = ShardedBackend.from_urls([acl_redis.url], timeout_ms=2000)
    wrong = ShardedBackend.from_urls(
        [acl_redis.url], timeout_ms=2000, options=ConnectionOptions(username=REDIS_USER, password="wrong")
    )
    try:
        for backend in (anonymous, wrong):
            with pytest.raises(StoreUnavailable, match=r"PING dp:active: expected every shard to answer"):
                await backend.control(Command("PING", keys.ACTIVE_POINTER))
    finally:
        await anonymous.aclose()
        await wrong.aclose()


def test_the_orchestrator_reads_redis_as_the_acl_user(secured_app: Any) -> None:
    ready = httpx.get(f"{secured_app.url}/readyz", timeout=5).json()
    assert ready["components"]["redis"] == "ok", ready
    answer = httpx.get(f"{secured_app.url}/v1/recommendations/5", timeout=5).json()
    assert answer["source"] in {"realtime", "cache"}, answer


def test_writes_need_the_api_key(secured_app: Any) -> None:
    url = f"{secured_app.url}/v1/events"
    missing = httpx.post(url, json=event(), timeout=5)
    wrong = httpx.post(url, json=event(), headers={"X-API-Key": "nope"}, timeout=5)
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["detail"].startswith("expected one valid X-API-Key header, but found")


def test_a_client_past_its_burst_gets_429_with_retry_after(secured_app: Any) -> None:
    url = f"{secured_app.url}/v1/events"
    statuses = [httpx.post(url, json=event(), headers={"X-API-Key": BURST_KEY}, timeout=5) for _ in range(5)]
    assert [r.status_code for r in statuses[:3]] == [202, 202, 202]
    limited = statuses[-1]
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["detail"].startswith("rate limit of 0.5 writes/s exceeded")


def test_a_big_body_is_413_and_an_over_long_field_is_422(secured_app: Any) -> None:
    url = f"{secured_app.url}/v1/events"
    headers = {"X-API-Key": API_KEY, "content-type": "application/json"}
    big = httpx.post(url, content=b'{"user_id": "' + b"1" * 2000 + b'"}', headers=headers, timeout=5)
    assert big.status_code == 413 and "exceeds the limit of 512" in big.json()["detail"]
    long_id = httpx.post(url, json=event("u" * 65), headers={"X-API-Key": API_KEY}, timeout=5)
    assert long_id.status_code == 422
    assert long_id.json()["detail"][0]["loc"] == ["body", "user_id"]


def test_no_secret_in_the_log_or_in_reprs(secured_app: Any) -> None:
    httpx.get(f"{secured_app.url}/v1/recommendations/not-a-user", timeout=5)
    log = Path(secured_app.log_path).read_text(errors="replace")
    for secret in (REDIS_PASSWORD, API_KEY):
        assert secret not in log
    settings = Settings(
        redis=RedisSettings(password=SecretStr(REDIS_PASSWORD)),
        events=EventsSettings(api_keys=SecretStr(f"edge:{API_KEY}")),
    )
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.redis.connection)):
        assert REDIS_PASSWORD not in text and API_KEY not in text


async def test_a_password_in_a_url_never_reaches_an_error_message() -> None:
    backend = ShardedBackend.from_urls([f"redis://u:{REDIS_PASSWORD}@127.0.0.1:1/0"], timeout_ms=500)
    try:
        with pytest.raises(StoreUnavailable, match=r"GET dp:active: expected every shard to answer, but 127.0.0.1:1 "):
            await backend.control(Command("GET", keys.ACTIVE_POINTER))
    finally:
        await backend.aclose()
